//! The device a command works on: the running one, through its control socket (it holds
//! the store), or the stopped one, through the store opened here. Both give the same
//! result structs, so a command prints the same thing either way.

use std::path::Path;

use tend_node::control::Client;
use tend_node::Device;

/// The device in a home.
pub enum Target {
    /// `tend run` answers on `control.sock`.
    Running(Client),
    /// Nobody runs there: the store is ours.
    Stopped(Box<Device>),
}

impl Target {
    /// The running device if one answers in `home`, else the store.
    pub fn open(home: &Path) -> Result<Target, Box<dyn std::error::Error>> {
        Ok(match Client::connect(home)? {
            Some(client) => Target::Running(client),
            None => Target::Stopped(Box::new(Device::open(home)?)),
        })
    }

    /// Refuses `--member-home` with a running device: its exchanges go over the network
    /// (and the other members' homes are locked by their own `tend run`).
    pub fn without_member_homes(
        self,
        member_homes: &[std::path::PathBuf],
    ) -> Result<Target, Box<dyn std::error::Error>> {
        if matches!(self, Target::Running(_)) && !member_homes.is_empty() {
            return Err(
                "the device is running: it reaches the other members over the \
                        network; drop --member-home"
                    .into(),
            );
        }
        Ok(self)
    }
}
