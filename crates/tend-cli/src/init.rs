//! `tend init`: a new device (its key and store) in a home.

use std::path::Path;

use crate::output::{CmdResult, Output};

/// `tend init`.
pub fn init(home: &Path) -> CmdResult {
    crate::backup::remove_stale_restores(home);
    let device = tend_node::upgrade::init_announced(home, &mut rand::rngs::OsRng)?;
    let id = device.device_id().to_string();
    Ok(Output::new(
        serde_json::json!({
            "device_id": id,
            "home": home,
            "namespace": device.namespace().to_string(),
        }),
        format!("initialised device {id}\nhome {}", home.display()),
    ))
}
