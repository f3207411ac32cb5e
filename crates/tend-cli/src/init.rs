//! `tend init`: a new device (its key and store) in a home.

use std::path::Path;

use tend_node::Device;

use crate::output::{CmdResult, Output};

/// `tend init`.
pub fn init(home: &Path) -> CmdResult {
    crate::backup::remove_stale_restores(home);
    let device = Device::init(home, &mut rand::rngs::OsRng)?;
    // Announced now rather than at the first `tend run`: until its release is known, a
    // device writes fact format 1 (untimed ids, one signature check each), so a device
    // written to before it ever ran would fill its journal with the slower format.
    tend_node::upgrade::advertise(&device)?;
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
