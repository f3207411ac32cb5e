//! The device a command works on: the running one, through its control socket (it holds
//! the store), or the stopped one, through the store opened here. Both give the same
//! result structs, so a command prints the same thing either way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tend_node::control::ops::Op;
use tend_node::control::{Client, Request};
use tend_node::fleet::LocalFleet;
use tend_node::Device;

use clap::Args as ClapArgs;

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

    /// Runs `op` on the device: sent through the socket to the running one, or run here
    /// on the stopped one. Both run the same [`Op::run`].
    pub fn run<O: Op + Into<Request>>(
        &mut self,
        op: O,
    ) -> Result<O::Output, Box<dyn std::error::Error>> {
        Ok(match self {
            Target::Running(c) => c.run(op)?,
            Target::Stopped(d) => op.run(d)?,
        })
    }

    /// Like [`Target::run`], for a command that takes `--member-home` (refused with a
    /// running device, which reaches its members over the network).
    pub fn run_with_members<O: Op + Into<Request>>(
        self,
        op: O,
        homes: &MemberHomes,
    ) -> Result<O::Output, Box<dyn std::error::Error>> {
        match self.without_member_homes(&homes.member_homes)? {
            Target::Running(mut c) => Ok(c.run(op)?),
            Target::Stopped(d) => among_members(*d, homes, |devices| Ok(op.run(devices[0])?)),
        }
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

/// This device and the member homes, for in-process exchanges; `None` without members.
pub(crate) fn fleet(
    me: Device,
    homes: &MemberHomes,
) -> Result<(Arc<Device>, Option<LocalFleet>), Box<dyn std::error::Error>> {
    let me = Arc::new(me);
    if homes.member_homes.is_empty() {
        return Ok((me, None));
    }
    let mut devices = vec![me.clone()];
    for h in &homes.member_homes {
        devices.push(Arc::new(Device::open(h)?));
    }
    Ok((me, Some(LocalFleet::new(devices))))
}

/// Runs `f` on this stopped device and the member homes (this one first), syncing them
/// before (so it sees their facts) and after (so they hold its outcome).
pub(crate) fn among_members<T>(
    me: Device,
    homes: &MemberHomes,
    f: impl FnOnce(&[&Device]) -> Result<T, Box<dyn std::error::Error>>,
) -> Result<T, Box<dyn std::error::Error>> {
    let (me, fleet) = fleet(me, homes)?;
    let devices: Vec<&Device> = match &fleet {
        Some(f) => f.devices().iter().map(|d| &**d).collect(),
        None => vec![&me],
    };
    if let Some(f) = &fleet {
        f.sync()?;
    }
    let out = f(&devices)?;
    if let Some(f) = &fleet {
        f.sync()?;
    }
    Ok(out)
}

/// The target, with `--member-home` refused on a running device.
pub(crate) fn target_with_homes(
    home: &Path,
    homes: &MemberHomes,
) -> Result<Target, Box<dyn std::error::Error>> {
    Target::open(home)?.without_member_homes(&homes.member_homes)
}

/// The error for a command that needs a running device and finds none.
pub(crate) fn no_device(home: &Path) -> Box<dyn std::error::Error> {
    format!(
        "no device is running in {} (start one with `tend run --home {}`)",
        home.display(),
        home.display()
    )
    .into()
}

pub(crate) fn short(id: &str) -> &str {
    id.get(..16).unwrap_or(id)
}

/// Where the other members' homes are (their devices must not be running).
#[derive(ClapArgs, Debug)]
pub struct MemberHomes {
    /// Home directory of another member device, to run the ceremony with in this process
    /// (only when this device is not running; a running device uses the network).
    #[arg(long = "member-home", value_name = "DIR")]
    pub member_homes: Vec<PathBuf>,
}

pub(crate) fn member_fleet(
    home: &Path,
    homes: &MemberHomes,
) -> Result<LocalFleet, Box<dyn std::error::Error>> {
    let mut devices = vec![Arc::new(Device::open(home)?)];
    for h in &homes.member_homes {
        devices.push(Arc::new(Device::open(h)?));
    }
    Ok(LocalFleet::new(devices))
}

/// The running device's control client, when there is one and no `--member-home` was
/// given (member homes of running devices are locked by them).
pub(crate) fn running_without_member_homes(
    home: &Path,
    homes: &MemberHomes,
) -> Result<Option<Client>, Box<dyn std::error::Error>> {
    let client = Client::connect(home)?;
    if client.is_some() && !homes.member_homes.is_empty() {
        return Err(
            "the device is running: the ceremony runs over the network with the \
                    running members; drop --member-home"
                .into(),
        );
    }
    Ok(client)
}
