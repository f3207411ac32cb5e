//! Upgrades end to end over three real device homes (a 2-of-3 authority made by DKG, facts
//! and blobs exchanged with the in-process `LocalFleet::sync`), the upgrade session state
//! machine, admin replacement and local cache floors.

use std::cell::Cell;
use std::path::Path;
use std::time::Duration;

use tend_core::authority::{AuthorityFact, MembershipChange};
use tend_core::maintenance::{
    cohort_of, MaintenanceFact, UpgradeActivated, UpgradeActivatedWhenReady, UpgradeMetadata,
    UpgradePolicy, UpgradeReady,
};
use tend_core::upgrade::ReadinessPolicy;
use tend_core::{
    ContentId, Epoch, Hash32, MaintenanceEpoch, Payload, ProtocolVersion, UnsignedFact,
};
use tend_node::fleet::LocalFleet;
use tend_node::upgrade::{
    self, ApplyOptions, ApplyReport, ArtifactSource, BlobInput, CommandInstaller, Installer,
    LocalStatus, Skip, UpgradeAction, UpgradeEvent, UpgradeInput, UpgradeSession,
};
use tend_node::{admin, cache, Device};
use tend_sync::FenceStatus;

const V11: ProtocolVersion = ProtocolVersion {
    major: 1,
    minor: 1,
    patch: 0,
};

/// Three homes in `dir`, made into a 2-of-3 authority administered by device 0.
fn fleet(dir: &Path) -> LocalFleet {
    let mut rng = rand::rngs::OsRng;
    let devices = ["a", "b", "c"]
        .iter()
        .map(|n| std::sync::Arc::new(Device::init(&dir.join(n), &mut rng).unwrap()))
        .collect();
    let mut fleet = LocalFleet::new(devices);
    fleet.create_authority(2, &mut rng).unwrap();
    fleet
}

/// The install step of the tests: a real shell command copying the artifact into the home.
fn copy_installer(d: &Device) -> CommandInstaller {
    CommandInstaller {
        command: r#"cp "$1" "$TEND_HOME/installed""#.into(),
        home: d.home().to_owned(),
        timeout: Duration::from_secs(30),
    }
}

fn run(d: &Device, installer: &mut dyn Installer, explicit: bool) -> ApplyReport {
    upgrade::apply(
        d,
        d.store(),
        installer,
        &ApplyOptions {
            explicit,
            retry: false,
        },
    )
    .unwrap()
}

fn events(r: &ApplyReport) -> Vec<UpgradeEvent> {
    r.packages.iter().flat_map(|p| p.events.clone()).collect()
}

#[test]
fn three_devices_go_from_published_to_activated() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let admin = &fleet.devices()[0];
    let artifact = b"tend 1.1.0 release artifact".to_vec();
    let meta = upgrade::publish(admin, &artifact, V11, None, 100).unwrap();
    assert!(matches!(
        upgrade::publish(admin, &artifact, V11, None, 100),
        Err(upgrade::UpgradeError::AlreadyPublished(_))
    ));
    // Not ready anywhere yet: activation is refused.
    assert!(matches!(
        upgrade::activate(admin, &meta.package_id, ReadinessPolicy::All),
        Err(upgrade::UpgradeError::NotReady { ready: 0, .. })
    ));
    fleet.sync().unwrap();

    for d in fleet.devices() {
        let report = run(d, &mut copy_installer(d), false);
        assert_eq!(
            events(&report),
            vec![
                UpgradeEvent::Verified,
                UpgradeEvent::Installed,
                UpgradeEvent::Ready
            ]
        );
        assert_eq!(std::fs::read(d.home().join("installed")).unwrap(), artifact);
        // A second run has nothing left to do.
        let again = run(d, &mut copy_installer(d), false);
        assert_eq!(again.packages[0].skipped, Some(Skip::AlreadyReady));
    }
    fleet.sync().unwrap();
    let state = admin.store().maintenance_state(admin.namespace()).unwrap();
    let r = state
        .readiness(&meta.package_id, ReadinessPolicy::All)
        .unwrap();
    assert_eq!((r.ready.len(), r.eligible.len(), r.satisfied), (3, 3, true));

    let activated = upgrade::activate(admin, &meta.package_id, ReadinessPolicy::All).unwrap();
    assert_eq!(activated.to_version, V11);
    assert_eq!(activated.activation_fence, None);
    fleet.sync().unwrap();
    for d in fleet.devices() {
        let s = upgrade::status(d).unwrap();
        assert!(s.packages[0].activated);
        assert_eq!(s.running_version, "1.1.0");
        assert_eq!(
            s.packages[0].local,
            Some(LocalStatus::Installed { version: V11 })
        );
        assert_eq!(s.fence_refusal, None);
        // Each device advertised what it runs.
        let st = d.store().maintenance_state(d.namespace()).unwrap();
        assert!(st.device_metadata.contains_key(&d.device_id()));
    }
}

#[test]
fn an_activation_written_before_the_devices_are_ready_counts_only_once_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let admin = &fleet.devices()[0];
    let meta = upgrade::publish(admin, b"tend 1.1.0, gated", V11, None, 100).unwrap();
    fleet.sync().unwrap();
    // An admin that skips the readiness check (an older tool, a script) writes the
    // activation anyway, asking for all three members.
    let state = admin.store().maintenance_state(admin.namespace()).unwrap();
    let early = UpgradeActivatedWhenReady {
        activation: UpgradeActivated {
            package_id: meta.package_id,
            to_version: V11,
            activation_fence: None,
        },
        min_ready: 3,
    };
    admin
        .write(UnsignedFact {
            namespace: admin.namespace(),
            epoch: state.package_fact_epoch(&meta.package_id).unwrap(),
            payload: Payload::Maintenance(MaintenanceFact::UpgradeActivatedWhenReady(early)),
        })
        .unwrap();
    fleet.sync().unwrap();
    for d in fleet.devices() {
        assert!(!upgrade::status(d).unwrap().packages[0].activated);
    }
    // Two of three ready: still not counted anywhere, and the status says what it waits for.
    for d in &fleet.devices()[..2] {
        run(d, &mut copy_installer(d), false);
    }
    fleet.sync().unwrap();
    for d in fleet.devices() {
        let st = d.store().maintenance_state(d.namespace()).unwrap();
        assert_eq!(st.upgrades[&meta.package_id].ready.len(), 2);
        let p = &upgrade::status(d).unwrap().packages[0];
        assert!(!p.activated);
        assert_eq!(p.activation_waits_for, Some(3));
    }
    // The third: every device now counts the activation, from the journal alone.
    let last = &fleet.devices()[2];
    run(last, &mut copy_installer(last), false);
    fleet.sync().unwrap();
    for d in fleet.devices() {
        let s = upgrade::status(d).unwrap();
        assert!(s.packages[0].activated);
        assert_eq!(s.packages[0].activation_waits_for, None);
        assert_eq!(s.running_version, "1.1.0");
    }
}

/// Hands out the stored artifact with one byte flipped, as a faulty disk or peer would.
struct Tampered<'a>(&'a tend_store::Store);

impl ArtifactSource for Tampered<'_> {
    fn fetch(&self, cid: &ContentId) -> BlobInput {
        match self.0.fetch(cid) {
            BlobInput::Bytes(mut b) => {
                b[0] ^= 1;
                BlobInput::Bytes(b)
            }
            other => other,
        }
    }
}

#[test]
fn a_corrupted_artifact_is_refused_on_every_device() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let admin = &fleet.devices()[0];
    let meta = upgrade::publish(admin, b"good artifact", V11, None, 100).unwrap();
    fleet.sync().unwrap();
    for d in fleet.devices() {
        let opts = ApplyOptions::default();
        let report =
            upgrade::apply(d, &Tampered(d.store()), &mut copy_installer(d), &opts).unwrap();
        let ev = events(&report);
        assert!(
            matches!(&ev[..], [UpgradeEvent::Refused { reason }] if reason.contains("does not match")),
            "{ev:?}"
        );
        assert!(report.has_failures());
        assert!(!d.home().join("installed").exists(), "never installed");
        // Recorded, so it is not fetched and refused over and over.
        let again = upgrade::apply(d, &Tampered(d.store()), &mut copy_installer(d), &opts).unwrap();
        assert!(matches!(
            again.packages[0].skipped,
            Some(Skip::Refused { .. })
        ));
    }
    fleet.sync().unwrap();
    let state = admin.store().maintenance_state(admin.namespace()).unwrap();
    assert!(state.upgrades[&meta.package_id].ready.is_empty());
}

#[test]
fn a_device_below_the_fence_is_refused_until_it_upgrades() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let [admin, b, c] = fleet.devices() else {
        unreachable!()
    };
    // Device c takes upgrades only when its operator says so.
    upgrade::set_policy(c, &UpgradePolicy::Manual).unwrap();
    let st = admin.store().maintenance_state(admin.namespace()).unwrap();
    // A fence at the current epoch: the hard fork takes effect as soon as it is activated.
    let fence = st.current_epoch();
    assert!(upgrade::publish(admin, b"fork", V11, Some(fence), 50).is_err());
    let meta = upgrade::publish(admin, b"fork", V11, Some(fence), 100).unwrap();
    fleet.sync().unwrap();
    for d in [admin, b] {
        assert!(events(&run(d, &mut copy_installer(d), false)).contains(&UpgradeEvent::Ready));
    }
    assert_eq!(
        run(c, &mut copy_installer(c), false).packages[0].skipped,
        Some(Skip::Manual)
    );
    fleet.sync().unwrap();
    assert!(upgrade::activate(admin, &meta.package_id, ReadinessPolicy::All).is_err());
    upgrade::activate(admin, &meta.package_id, ReadinessPolicy::AtLeast(2)).unwrap();
    fleet.sync().unwrap();

    // What each device puts in its sync handshake (tend-sync's `FenceStatus`) and the
    // pure predicate agree: c is below the fence and refuses; a and b are fine.
    let handshake = |d: &Device| {
        let st = d.store().maintenance_state(d.namespace()).unwrap();
        let running = upgrade::running_version(d, &st).unwrap();
        FenceStatus::from_state(&st, st.current_epoch(), running)
    };
    for d in [admin, b] {
        assert_eq!(handshake(d), FenceStatus::Satisfied);
        assert!(upgrade::fence_check(d).unwrap().is_ok());
    }
    let refusal = upgrade::fence_check(c).unwrap().unwrap_err();
    let text = refusal.to_string();
    assert!(
        text.contains("version 1.1.0 mandatory")
            && text.contains(&format!(
                "this device runs version {}",
                ProtocolVersion::CURRENT
            )),
        "{text}"
    );
    assert!(matches!(
        handshake(c),
        FenceStatus::NotSatisfied { required, .. } if required == V11
    ));
    // A peer announcing the old version is refused by an upgraded responder.
    let st = b.store().maintenance_state(b.namespace()).unwrap();
    let peer = st
        .fence_check_peer(st.current_epoch(), ProtocolVersion::CURRENT)
        .unwrap_err();
    assert!(peer.to_string().contains(&format!(
        "the peer runs version {}",
        ProtocolVersion::CURRENT
    )));
    assert!(upgrade::status(c).unwrap().fence_refusal.is_some());

    // The operator upgrades c (the artifact arrived before the fork): accepted again.
    let report = run(c, &mut copy_installer(c), true);
    assert!(events(&report).contains(&UpgradeEvent::Installed));
    assert!(upgrade::fence_check(c).unwrap().is_ok());
    assert_eq!(handshake(c), FenceStatus::Satisfied);
    assert_eq!(upgrade::status(c).unwrap().fence_refusal, None);
}

/// Runs nothing but counts, and lets the identity epoch advance mid-session the way a
/// membership change arriving by sync would.
struct AdvancingInstaller<'a> {
    device: &'a Device,
    change: Option<tend_core::VerifiedFact>,
    runs: &'a Cell<u32>,
}

impl Installer for AdvancingInstaller<'_> {
    fn install(&mut self, _: &UpgradeMetadata, artifact: &Path) -> Result<(), String> {
        assert!(artifact.exists());
        self.runs.set(self.runs.get() + 1);
        if let Some(f) = self.change.take() {
            let r = self.device.store().insert_batch(&[f]).unwrap();
            assert_eq!(r.inserted, 1);
        }
        Ok(())
    }
}

#[test]
fn an_identity_epoch_advance_aborts_the_pipeline_and_it_retries() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let [admin, b, _] = fleet.devices() else {
        unreachable!()
    };
    let meta = upgrade::publish(admin, b"artifact", V11, None, 100).unwrap();
    fleet.sync().unwrap();
    let st = admin.store().maintenance_state(admin.namespace()).unwrap();
    let m = st.membership().unwrap().clone();
    assert_eq!(m.identity_epoch, 1);
    // The admin re-deals (same members here): identity epoch 2.
    let change = UnsignedFact {
        namespace: admin.namespace(),
        epoch: st.current_epoch(),
        payload: Payload::Authority(AuthorityFact::MembershipChanged(MembershipChange {
            identity_epoch: 2,
            members: m.members.iter().copied().collect(),
            threshold: m.threshold,
            group_key: m.group_key,
        })),
    }
    .sign(admin.key().signing_key());
    let runs = Cell::new(0);
    let mut installer = AdvancingInstaller {
        device: b,
        change: Some(change),
        runs: &runs,
    };
    let report = run(b, &mut installer, false);
    assert_eq!(report.aborted_sessions, 1);
    assert_eq!(
        events(&report),
        vec![
            UpgradeEvent::Verified,
            UpgradeEvent::Installed,
            UpgradeEvent::Aborted { from: 1, to: 2 },
            // Retried under identity epoch 2: verified again, not installed again.
            UpgradeEvent::Verified,
            UpgradeEvent::Ready,
        ]
    );
    assert_eq!(runs.get(), 1);
    let st = b.store().maintenance_state(b.namespace()).unwrap();
    assert_eq!(st.identity_epoch(), 2);
    assert!(st.upgrades[&meta.package_id].ready.contains(&b.device_id()));
}

#[test]
fn the_session_machine_aborts_on_an_epoch_advance_and_refuses_bad_bytes() {
    let meta = UpgradeMetadata {
        package_id: Hash32([1; 32]),
        version: V11,
        artifact_hash: Hash32::of(b"abc"),
        artifact_size: 3,
        fence: None,
        cohort_percent: 100,
    };
    let e1 = MaintenanceEpoch {
        identity_epoch: 1,
        snapshot_epoch: Epoch(0),
    };
    let e2 = MaintenanceEpoch {
        identity_epoch: 2,
        ..e1
    };
    let (mut s, first) = UpgradeSession::start(meta.clone(), e1, true, 0, 3);
    assert!(matches!(first[..], [UpgradeAction::FetchBlob { .. }]));
    let out = s.handle(UpgradeInput::Blob {
        epoch: e2,
        blob: BlobInput::Bytes(b"abc".to_vec()),
    });
    assert_eq!(
        out,
        vec![UpgradeAction::Report(UpgradeEvent::Aborted {
            from: 1,
            to: 2
        })]
    );
    assert!(s.is_aborted());

    // Wrong size under the right hash cannot happen; wrong bytes are refused, not installed.
    let (mut s, _) = UpgradeSession::start(meta.clone(), e1, true, 0, 3);
    let out = s.handle(UpgradeInput::Blob {
        epoch: e1,
        blob: BlobInput::Bytes(b"abd".to_vec()),
    });
    assert!(matches!(
        &out[..],
        [
            UpgradeAction::Record(LocalStatus::Refused { .. }),
            UpgradeAction::Report(UpgradeEvent::Refused { .. })
        ]
    ));

    // The good path, with a failing install reported as the last attempt.
    let (mut s, _) = UpgradeSession::start(meta.clone(), e1, true, 2, 3);
    let out = s.handle(UpgradeInput::Blob {
        epoch: e1,
        blob: BlobInput::Bytes(b"abc".to_vec()),
    });
    assert!(matches!(&out[1], UpgradeAction::Install { .. }));
    let out = s.handle(UpgradeInput::InstallFinished {
        epoch: e1,
        result: Err("boom".into()),
    });
    assert_eq!(
        out[1],
        UpgradeAction::Report(UpgradeEvent::InstallFailed {
            reason: "boom".into(),
            attempts: 3,
            gave_up: true
        })
    );
    let (mut s, _) = UpgradeSession::start(meta, e1, true, 0, 3);
    s.handle(UpgradeInput::Blob {
        epoch: e1,
        blob: BlobInput::Bytes(b"abc".to_vec()),
    });
    let out = s.handle(UpgradeInput::InstallFinished {
        epoch: e1,
        result: Ok(()),
    });
    assert!(out.contains(&UpgradeAction::WriteReady(UpgradeReady {
        package_id: Hash32([1; 32]),
        version: V11
    })));
    assert!(s.is_finished());
}

#[test]
fn a_failing_install_is_reported_and_not_retried_forever() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let b = &fleet.devices()[1];
    upgrade::publish(&fleet.devices()[0], b"x", V11, None, 100).unwrap();
    fleet.sync().unwrap();
    let mut failing = CommandInstaller {
        command: "echo disk full >&2; exit 3".into(),
        home: b.home().to_owned(),
        timeout: Duration::from_secs(30),
    };
    for attempt in 1..=3u32 {
        let ev = events(&run(b, &mut failing, false));
        assert_eq!(
            ev[1],
            UpgradeEvent::InstallFailed {
                reason: "install command exited with status 3: disk full".into(),
                attempts: attempt,
                gave_up: attempt == 3,
            }
        );
    }
    let skipped = run(b, &mut failing, false);
    assert!(matches!(
        skipped.packages[0].skipped,
        Some(Skip::Failed { attempts: 3, .. })
    ));
    // An explicit retry starts afresh; this time the command works.
    let report = upgrade::apply(
        b,
        b.store(),
        &mut copy_installer(b),
        &ApplyOptions {
            explicit: true,
            retry: true,
        },
    )
    .unwrap();
    assert!(events(&report).contains(&UpgradeEvent::Ready));
}

#[test]
fn a_staged_rollout_reaches_exactly_its_cohort() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let admin = &fleet.devices()[0];
    let meta = upgrade::publish(admin, b"staged", V11, None, 50).unwrap();
    fleet.sync().unwrap();
    for d in fleet.devices() {
        let report = run(d, &mut copy_installer(d), false);
        let in_cohort = cohort_of(&meta.package_id, &d.device_id()) < 50;
        assert_eq!(meta.includes(&d.device_id()), in_cohort);
        assert_eq!(d.home().join("installed").exists(), in_cohort);
        if !in_cohort {
            assert!(matches!(
                report.packages[0].skipped,
                Some(Skip::NotInCohort {
                    cohort_percent: 50,
                    ..
                })
            ));
        }
        let s = upgrade::status(d).unwrap();
        assert_eq!(s.packages[0].in_cohort, in_cohort);
    }
}

#[test]
fn widening_a_rollout_keeps_the_devices_in_and_brings_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let admin = &fleet.devices()[0];
    let meta = upgrade::publish(admin, b"widening", V11, None, 1).unwrap();
    fleet.sync().unwrap();
    let before: Vec<bool> = fleet
        .devices()
        .iter()
        .map(|d| meta.includes(&d.device_id()))
        .collect();
    // Only the admin widens, and a rollout never narrows.
    assert!(matches!(
        upgrade::widen(&fleet.devices()[1], &meta.package_id, 100),
        Err(upgrade::UpgradeError::NotAdmin(_))
    ));
    assert!(matches!(
        upgrade::widen(admin, &meta.package_id, 1),
        Err(upgrade::UpgradeError::Invalid(_))
    ));
    let widened = upgrade::widen(admin, &meta.package_id, 100).unwrap();
    assert_eq!(widened.package_id, meta.package_id);
    fleet.sync().unwrap();
    for (d, was_in) in fleet.devices().iter().zip(before) {
        let s = upgrade::status(d).unwrap();
        assert_eq!(s.packages.len(), 1, "the same package, not a new one");
        assert_eq!(s.packages[0].cohort_percent, 100);
        assert!(s.packages[0].in_cohort, "in at 100% (was in: {was_in})");
        run(d, &mut copy_installer(d), false);
        assert!(d.home().join("installed").exists());
    }
}

#[test]
fn admin_replacement_by_the_admin_and_by_the_authority() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let [a, b, c] = fleet.devices() else {
        unreachable!()
    };
    let now = a
        .store()
        .maintenance_state(a.namespace())
        .unwrap()
        .current_epoch();
    assert!(
        admin::replace(b, c.device_id(), Epoch(now.0 + 2)).is_err(),
        "b is not admin"
    );
    assert!(
        admin::replace(a, b.device_id(), now).is_err(),
        "must be in the future"
    );
    // a is unavailable: b and c replace it with b, by threshold signature.
    let at = Epoch(now.0 + 2);
    admin::replace_with_threshold(
        &[&**b, &**c],
        None,
        b.device_id(),
        at,
        &mut rand::rngs::OsRng,
    )
    .unwrap();
    fleet.sync().unwrap();
    let s = admin::status(a).unwrap();
    assert_eq!(s.replacements.len(), 1);
    assert!(s.replacements[0].certified && !s.replacements[0].in_effect);
    assert_eq!(
        s.admin,
        Some(a.device_id().to_string()),
        "not in effect yet"
    );
    // Past the activation epoch, a's admin operations are kept but ignored.
    let late = UnsignedFact {
        namespace: a.namespace(),
        epoch: at,
        payload: Payload::Maintenance(MaintenanceFact::UpgradePublished(UpgradeMetadata {
            package_id: Hash32([9; 32]),
            version: V11,
            artifact_hash: Hash32([9; 32]),
            artifact_size: 1,
            fence: None,
            cohort_percent: 100,
        })),
    };
    let late = a.write(late).unwrap();
    fleet.sync().unwrap();
    for d in fleet.devices() {
        let st = d.store().maintenance_state(d.namespace()).unwrap();
        assert!(st.ignored.contains(&late.id()));
        assert!(st.upgrades.is_empty());
        assert_eq!(
            admin::status(d).unwrap().admin,
            Some(b.device_id().to_string())
        );
    }
    // The new admin works, and a no longer can.
    assert!(upgrade::publish(a, b"x", V11, None, 100).is_err());
    upgrade::publish(b, b"x", V11, None, 100).unwrap();
    admin::replace(b, c.device_id(), Epoch(at.0 + 5)).unwrap();
    assert!(
        admin::replace(b, a.device_id(), Epoch(at.0 + 6)).is_err(),
        "one pending replacement at a time"
    );
}

#[test]
fn cache_floors_are_local_persisted_and_only_rise() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let [a, b, _] = fleet.devices() else {
        unreachable!()
    };
    let now = a
        .store()
        .maintenance_state(a.namespace())
        .unwrap()
        .current_epoch();
    let key = "user/42".to_string();
    assert!(
        cache::check(a, &key, Epoch(0)).unwrap().valid,
        "never invalidated"
    );
    let (_, inv) = cache::invalidate(a, std::slice::from_ref(&key), None).unwrap();
    assert_eq!(inv.epoch_floor, now.0);
    assert!(!cache::check(a, &key, now).unwrap().valid);
    assert!(cache::check(a, &key, now.next()).unwrap().valid);
    assert!(cache::invalidate(a, std::slice::from_ref(&key), Some(Epoch(now.0 + 100))).is_err());
    assert!(cache::invalidate(a, &[], None).is_err());

    fleet.sync().unwrap();
    assert_eq!(cache::check(b, &key, now).unwrap().floor, Some(now.0));
    // A local raise on b only, persisted in b's settings.
    cache::invalidate_local(b, std::slice::from_ref(&key), Epoch(now.0 + 3)).unwrap();
    // An older invalidation arriving later does not lower it.
    cache::invalidate(a, std::slice::from_ref(&key), Some(Epoch(1))).unwrap();
    fleet.sync().unwrap();
    let home = b.home().to_owned();
    drop(fleet);
    let b = Device::open(&home).unwrap();
    let check = cache::check(&b, &key, Epoch(now.0 + 3)).unwrap();
    assert_eq!(check.floor, Some(now.0 + 3));
    assert!(!check.valid);
    assert!(cache::check(&b, &key, Epoch(now.0 + 4)).unwrap().valid);
}

/// Activating a release tombstones the artifacts of older ones, so blob storage stays
/// bounded: GC reclaims them once a snapshot covers the tombstone.
#[test]
fn activating_a_release_tombstones_older_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path());
    let admin = &fleet.devices()[0];
    let v12 = ProtocolVersion {
        major: 1,
        minor: 2,
        patch: 0,
    };
    let old = upgrade::publish(admin, b"tend 1.1.0", V11, None, 100).unwrap();
    let new = upgrade::publish(admin, b"tend 1.2.0", v12, None, 100).unwrap();
    fleet.sync().unwrap();
    for d in fleet.devices() {
        run(d, &mut copy_installer(d), false);
    }
    fleet.sync().unwrap();
    upgrade::activate(admin, &new.package_id, ReadinessPolicy::All).unwrap();
    let state = admin.store().maintenance_state(admin.namespace()).unwrap();
    let old_cid = upgrade::artifact_cid(&old.artifact_hash);
    let new_cid = upgrade::artifact_cid(&new.artifact_hash);
    assert!(
        state.tombstones.contains_key(&old_cid),
        "the 1.1 artifact is superseded"
    );
    assert!(
        !state.tombstones.contains_key(&new_cid),
        "the 1.2 artifact stays"
    );
}
