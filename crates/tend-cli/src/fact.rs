//! `tend fact add`: an application fact, appended to the log named by its kind.

use std::path::Path;

use clap::Subcommand;
use tend_node::control::Client;
use tend_node::Device;

use crate::output::{CmdResult, Output};

#[derive(Subcommand, Debug)]
pub enum FactCommand {
    /// Append an application fact to the device's journal.
    Add {
        /// The application's name for this kind of fact.
        #[arg(long)]
        kind: String,
        /// The fact's data, as text.
        #[arg(long)]
        data: String,
    },
}

/// `tend fact add`, through the running device if one answers in `home`.
pub fn fact(home: &Path, cmd: FactCommand) -> CmdResult {
    let FactCommand::Add { kind, data } = cmd;
    if let Some(out) = add_fact_via_socket(home, &kind, &data)? {
        return Ok(out);
    }
    let device = Device::open(home)?;
    let fact = device.add_application_fact(&kind, data.as_bytes())?;
    Ok(Output::new(
        serde_json::json!({ "id": fact.id().to_string(), "epoch": fact.epoch().0 }),
        format!("added fact {} at epoch {}", fact.id(), fact.epoch()),
    ))
}

/// Adds a fact through the running device, if one answers in `home`.
fn add_fact_via_socket(
    home: &Path,
    kind: &str,
    data: &str,
) -> Result<Option<Output>, Box<dyn std::error::Error>> {
    let Some(mut c) = Client::connect(home)? else {
        return Ok(None);
    };
    let fact = c.add_fact(kind, data)?;
    Ok(Some(Output::new(
        serde_json::json!({ "id": fact.id, "epoch": fact.epoch }),
        format!("added fact {} at epoch {}", fact.id, fact.epoch),
    )))
}
