//! A shared to-do list on two devices: `cargo run -p tend --example todo`.
//!
//! Two devices in temporary directories, on 127.0.0.1, form an authority (a 2-of-2 FROST
//! key made over the network). The phone adds and completes items; the laptop follows its
//! own changes feed and sees them arrive live, then prints the list. Exits 0 when the
//! laptop saw every update, 1 if one did not arrive within 15 s.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tend::{ChangeKind, Device, PutValue, SyncOptions};

/// How long the laptop waits for the phone's updates.
const TIMEOUT: Duration = Duration::from_secs(15);

/// An item is stored as its state and its text: `[ ] buy milk`, `[x] buy milk`.
fn item(done: bool, text: &str) -> String {
    format!("[{}] {text}", if done { 'x' } else { ' ' })
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("todo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    // Each device is a home directory; an app keeps its own, e.g. in the user's data dir.
    let phone = Device::create(dir.path().join("phone"))?;
    let laptop = Device::create(dir.path().join("laptop"))?;
    let options = SyncOptions::new().sync_interval(Duration::from_millis(250));
    let phone_addr = phone.start(options.clone()).await?;
    let laptop_addr = laptop.start(options).await?;
    // Each knows the other; the laptop accepts the phone's key generation because the
    // phone is one of its peers.
    phone.add_peer(laptop_addr)?;
    laptop.add_peer(phone_addr)?;

    // The phone is the admin of its own one-device authority; it makes a 2-of-2 authority
    // of both while the laptop joins.
    let members = [laptop.id()];
    let (made, _) = tokio::try_join!(
        phone.create_authority(2, &members),
        laptop.join(phone_addr, Duration::from_secs(30)),
    )?;
    println!(
        "authority {} of {} devices ({:.1} s)",
        &made.id[..20],
        made.members.len(),
        started.elapsed().as_secs_f64()
    );

    // The laptop follows everything after what it has now (an app would persist the
    // cursor of the last change it handled and resume from it).
    let mut changes = Box::pin(laptop.subscribe(laptop.last_cursor()?));

    // The phone adds three items, then completes two. Each write goes to the laptop at
    // once (push on write); the laptop's subscription wakes for it.
    let items = ["buy milk", "water the plants", "call mum"];
    let writer = phone.clone();
    let writes = tokio::spawn(async move {
        for (i, text) in items.iter().enumerate() {
            writer.put("todo", &i.to_string(), item(false, text))?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        writer.put("todo", "0", item(true, items[0]))?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.put("todo", "2", item(true, items[2]))?;
        Ok::<_, tend::Error>(())
    });

    let want: BTreeMap<String, String> = [
        ("0".to_string(), item(true, items[0])),
        ("1".to_string(), item(false, items[1])),
        ("2".to_string(), item(true, items[2])),
    ]
    .into();
    let mut list = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while list != want {
        let change = match tokio::time::timeout_at(deadline, changes.next()).await {
            Err(_) => {
                return Err(format!(
                    "the laptop's list is {list:?} after {TIMEOUT:?}, not {want:?}"
                )
                .into())
            }
            Ok(None) => return Err("the changes feed ended".into()),
            Ok(Some(change)) => change?,
        };
        if let ChangeKind::Put {
            collection,
            key,
            value: PutValue::Bytes(value),
        } = change.kind
        {
            if collection == "todo" {
                let text = String::from_utf8_lossy(&value).into_owned();
                println!(
                    "laptop sees #{key}: {text}   (cursor {}, {:.2} s)",
                    change.cursor,
                    started.elapsed().as_secs_f64()
                );
                // The change is a write; what the key reads as after it is the merged value.
                if let Some(entry) = laptop.get("todo", &key)? {
                    list.insert(key, String::from_utf8_lossy(&entry.value).into_owned());
                }
            }
        }
    }

    writes.await??;
    println!("\nthe laptop's to-do list:");
    for entry in laptop.scan("todo", &tend::Scan::new())? {
        println!("  {}", String::from_utf8_lossy(&entry.value));
    }
    phone.stop().await;
    laptop.stop().await;
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
