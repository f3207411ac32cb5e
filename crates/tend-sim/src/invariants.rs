//! The invariants checked after the heal phase (see the crate docs for their exact
//! definitions).

use std::collections::{BTreeMap, BTreeSet};

use tend_core::maintenance::AdminReplacement;
use tend_core::{
    AppState, AuthorityFact, DataOp, DeviceId, Epoch, FactId, MaintenanceFact, MaintenanceState,
    Payload, VerifiedFact,
};

use crate::device::{is_state_fact, Key};
use crate::sim::Sim;

/// The reference device (the one with the newest view) and the final members (indices).
pub fn final_members(sim: &Sim) -> (usize, Vec<usize>) {
    // The reference is the member (in its own view) with the newest view.
    // A hostile device (`bad_peer`) is not held to the invariants: the honest ones are.
    let honest = |d: &usize| sim.bad_peer() != Some(*d);
    let r = (0..sim.devices.len())
        .filter(honest)
        .filter(|d| {
            let c = &sim.devices[*d].core;
            c.state
                .membership()
                .is_some_and(|m| m.members.contains(&c.me))
        })
        .max_by_key(|d| {
            let c = &sim.devices[*d].core;
            (
                c.state.identity_epoch(),
                c.state.snapshot_epoch(),
                c.effective_items(false).len(),
                std::cmp::Reverse(*d),
            )
        })
        .unwrap_or(0);
    let members = sim.devices[r]
        .core
        .state
        .membership()
        .map(|m| m.members.clone())
        .unwrap_or_default();
    let u = (0..sim.devices.len())
        .filter(honest)
        .filter(|d| members.contains(&sim.devices[*d].core.me))
        .collect();
    (r, u)
}

/// Why the final members do not (yet) agree, if they do not.
///
/// Two devices agree when they have settled the same latest snapshot (epoch E), hold the
/// same facts at or above E (tail digest), and have the same `state_digest`. Below E they
/// may differ by what pruning removed; that part is checked separately (archive devices
/// hold only covered facts there, pruned devices only covered state facts).
pub fn disagreement(sim: &Sim) -> Option<String> {
    let (r, u) = final_members(sim);
    let rc = &sim.devices[r].core;
    let e = rc.state.snapshot_epoch();
    let (items, state) = (rc.tail_digest(e), rc.state.state_digest());
    for d in u {
        let c = &sim.devices[d].core;
        if !sim.devices[d].online {
            return Some(format!("member {d} is offline"));
        }
        if c.tail_digest(e) != items {
            let count = |c: &crate::device::Core| c.all().filter(|(k, _)| k.0 >= e).count();
            return Some(format!(
                "journal digest at/above epoch {e} of device {d} ({} facts) differs from device {r} ({} facts)",
                count(c),
                count(rc)
            ));
        }
        if c.state.state_digest() != state {
            return Some(format!(
                "state digest of device {d} differs from device {r}"
            ));
        }
        if c.durable.settled != rc.state.snapshot_epoch() {
            return Some(format!(
                "device {d} settled snapshot epoch {} but the latest is {}",
                c.durable.settled,
                rc.state.snapshot_epoch()
            ));
        }
    }
    None
}

/// Checks every invariant and records violations in `sim.violations`.
pub fn check(sim: &mut Sim) {
    let mut v = Vec::new();
    if let Some(why) = disagreement(sim) {
        v.push(format!(
            "no convergence after {} heal rounds: {why}",
            sim.stats.heal_rounds
        ));
    }
    let (r, u) = final_members(sim);
    for (d, dev) in sim.devices.iter().enumerate() {
        if let Some(id) = dev.core.crossed_fence.first() {
            v.push(format!(
                "device {d} admitted fact {id} through a session while its activation fence was not satisfied ({} facts)",
                dev.core.crossed_fence.len()
            ));
        }
    }
    let rc = &sim.devices[r].core;
    let state = &rc.state;
    let e = state.snapshot_epoch();
    // The journal as it truly is: below E the facts the snapshot covers, at or above E
    // the facts every member holds (see `check_app_state`).
    let covered: BTreeSet<Key> = u
        .iter()
        .flat_map(|d| sim.devices[*d].core.durable.covered.iter().copied())
        .collect();
    let prefix = covered_prefix(sim, &u, &covered, e);
    let live_below = tend_snapshot::blob::live_facts(sim.namespace, prefix.values());
    // Pruning shape: below E an archive device holds only covered facts, a pruned one
    // only covered state facts and the application facts live in the prefix below E.
    for &d in &u {
        let c = &sim.devices[d].core;
        for ((ep, id), f) in c.durable.facts.range(..(e, FactId([0; 32]))) {
            if !c.durable.covered.contains(&(*ep, *id)) {
                v.push(format!(
                    "device {d} holds fact {id} at epoch {ep}, below snapshot {e} and not covered"
                ));
            } else if !c.archive && !is_state_fact(f) && !live_below.contains(&(*ep, *id)) {
                v.push(format!(
                    "non-archive device {d} kept application fact {id} ({}) below {e}, not live in the prefix",
                    f.payload().kind_name()
                ));
            }
        }
    }
    let (app_violations, conflicts) = check_app_state(sim, r, &u, &prefix);
    v.extend(app_violations);
    // No valid fact lost.
    let members: BTreeSet<DeviceId> = u.iter().map(|d| sim.devices[*d].core.me).collect();
    for (k, (f, holders)) in &sim.oracle.facts {
        if matches!(f.payload(), Payload::Authority(AuthorityFact::Genesis(_))) {
            continue;
        }
        if !state.is_member_at(&f.author(), f.epoch()) {
            continue; // not valid: never admitted anywhere
        }
        if !holders.iter().any(|h| u.contains(h)) {
            continue; // stranded on devices that left the authority
        }
        if k.0 >= e {
            for &d in &u {
                if !sim.devices[d].core.holds(k) {
                    v.push(format!(
                        "valid fact {} ({}, epoch {}) durable on {holders:?} is missing on device {d}",
                        k.1,
                        f.payload().kind_name(),
                        k.0
                    ));
                }
            }
        } else if u
            .iter()
            .any(|d| sim.devices[*d].core.durable.covered.contains(k))
        {
            // Accounted for by the snapshot.
        } else if f.payload().is_reissuable() && members.contains(&f.author()) {
            // Re-issued: a copy with the same author and payload is held at or above E,
            // or is itself covered by the snapshot (re-issued, then snapshotted).
            let same = |g: &VerifiedFact| g.author() == f.author() && g.payload() == f.payload();
            let held = rc.all().any(|((ep, _), g)| *ep >= e && same(g));
            let covered_copy = sim.oracle.facts.iter().any(|(gk, (g, _))| {
                gk.0 < e
                    && same(g)
                    && u.iter()
                        .any(|d| sim.devices[*d].core.durable.covered.contains(gk))
            });
            // Or its value is gone anyway: a later write supersedes it (the author
            // re-issues what is live in its own state, never what it overwrote).
            let superseded = sim
                .oracle
                .facts
                .values()
                .any(|(g, _)| supersedes(g.payload()).contains(&f.id()));
            if !held && !covered_copy && !superseded {
                v.push(format!(
                    "late fact {} ({}, epoch {} < snapshot {e}) was neither covered nor re-issued",
                    k.1,
                    f.payload().kind_name(),
                    k.0
                ));
            }
        }
    }
    v.extend(check_admin(
        rc.all().map(|(_, f)| f),
        state,
        &sim.replacements,
    ));
    sim.stats.conflicts = conflicts;
    sim.violations.extend(v);
}

/// Every valid fact below `e` that the snapshot covers: each one some device ever held
/// durably (the oracle) or a final member holds now (hydrated from a blob).
fn covered_prefix(
    sim: &Sim,
    u: &[usize],
    covered: &BTreeSet<Key>,
    e: Epoch,
) -> BTreeMap<Key, VerifiedFact> {
    let state = &sim.devices[final_members(sim).0].core.state;
    let valid = |f: &VerifiedFact| {
        matches!(f.payload(), Payload::Authority(AuthorityFact::Genesis(_)))
            || state.is_member_at(&f.author(), f.epoch())
    };
    let below = ..(e, FactId([0; 32]));
    let held = u
        .iter()
        .flat_map(|d| sim.devices[*d].core.durable.facts.range(below));
    sim.oracle
        .facts
        .range(below)
        .map(|(k, (f, _))| (k, f))
        .chain(held)
        .filter(|(k, f)| covered.contains(k) && valid(f))
        .map(|(k, f)| (*k, f.clone()))
        .collect()
}

/// No live application value is lost, and every replica reads the state of the whole
/// journal (issue 14 point 5).
///
/// The reference is the application state of the journal as it truly is after heal, built
/// without trusting any device's pruning: below the snapshot epoch E, every valid fact the
/// snapshot covers (`prefix`: the oracle saw every fact that was ever durable anywhere,
/// pruned or not); at or above E, the reference device's facts (every member holds the same
/// ones there, which `disagreement` checks). Facts below E that the snapshot does not cover
/// are left out: they were answered `Late` and retracted, and their payloads re-issued at
/// or above E (checked by "no valid fact lost"), so the re-issues stand in for them. Each
/// member's own facts, pruned or not, must fold to the same state: the same digest of live
/// facts under the agreed cache floors. A GC that drops a live fact leaves a member short
/// of a fact the reference reads, and this fails, even when every device pruned alike.
///
/// Also returns the keys of the reference state that read with a conflict (a statistic).
fn check_app_state(
    sim: &Sim,
    r: usize,
    u: &[usize],
    prefix: &BTreeMap<Key, VerifiedFact>,
) -> (Vec<String>, u64) {
    let rc = &sim.devices[r].core;
    let e = rc.state.snapshot_epoch();
    let floors = &rc.state.cache_floors;
    let tail = rc.all().filter(|(k, _)| k.0 >= e).map(|(_, f)| f);
    let reference = AppState::of(prefix.values().chain(tail));
    let want = reference.live_facts(floors);
    let conflicts = ["c0", "c1"]
        .iter()
        .flat_map(|c| reference.scan(c, "", None))
        .filter(|(_, entry)| !entry.conflicts.is_empty())
        .count() as u64;
    let digest = reference.digest(floors);
    let mut v = Vec::new();
    for &d in u {
        let c = &sim.devices[d].core;
        let app = c.app_state();
        if app.digest(floors) == digest {
            continue;
        }
        let have = app.live_facts(floors);
        let kind = |k: &Key| {
            prefix
                .get(k)
                .or_else(|| rc.all().find(|(x, _)| *x == k).map(|(_, f)| f))
                .or_else(|| c.all().find(|(x, _)| *x == k).map(|(_, f)| f))
                .map_or("?".into(), |f| f.payload().kind_name())
        };
        let lost: Vec<&Key> = want.difference(&have).collect();
        let extra: Vec<&Key> = have.difference(&want).collect();
        let first = |ks: &[&Key]| {
            ks.first().map_or(String::new(), |k| {
                format!(", e.g. {} ({}) at epoch {}", k.1, kind(k), k.0 .0)
            })
        };
        v.push(format!(
            "application state of {} device {d} differs from the state of the whole journal (snapshot {e}): {} live facts missing{}, {} extra{}",
            if c.archive { "archive" } else { "pruned" },
            lost.len(),
            first(&lost),
            extra.len(),
            first(&extra)
        ));
    }
    (v, conflicts)
}

fn admin_of(initial: DeviceId, applied: &[AdminReplacement], epoch: Epoch) -> DeviceId {
    let mut chain: Vec<&AdminReplacement> = applied.iter().collect();
    chain.sort_by_key(|r| r.activation_epoch);
    let mut admin = initial;
    for r in chain {
        if r.old_admin == admin && r.activation_epoch <= epoch {
            admin = r.new_admin;
        }
    }
    admin
}

fn is_admin_op(f: &VerifiedFact) -> bool {
    match f.payload() {
        Payload::Maintenance(m) => m.is_admin_operation(),
        Payload::Authority(AuthorityFact::MembershipChanged(_)) => true,
        _ => false,
    }
}

/// Rule 8, recomputed from the journal alone: every admin operation whose author is not
/// the admin at its epoch (in particular a retired admin's) is ignored by reduction, and
/// the reducer's admin chain is the one the journal implies.
fn check_admin<'a>(
    facts: impl Iterator<Item = &'a VerifiedFact>,
    state: &MaintenanceState,
    ledger: &[(DeviceId, DeviceId, Epoch)],
) -> Vec<String> {
    let mut v = Vec::new();
    let Some(initial) = state.initial_admin else {
        return vec!["reference state has no admin".into()];
    };
    let mut facts: Vec<&VerifiedFact> = facts.collect();
    facts.sort_by_key(|f| f.order_key());
    let mut applied: Vec<AdminReplacement> = Vec::new();
    for f in &facts {
        if !is_admin_op(f) {
            continue;
        }
        let admin = admin_of(initial, &applied, f.epoch());
        if f.author() != admin {
            if !state.ignored.contains(&f.id()) {
                v.push(format!(
                    "admin operation {} ({}) by a non-admin at epoch {} took effect",
                    f.id(),
                    f.payload().kind_name(),
                    f.epoch()
                ));
            }
            continue;
        }
        if let Payload::Maintenance(MaintenanceFact::AdminReplacement(r)) = f.payload() {
            let first = !applied.iter().any(|a| a.old_admin == r.old_admin);
            let valid = r.old_admin == f.author()
                && r.activation_epoch > f.epoch()
                && r.new_admin != r.old_admin
                && state.is_member_at(&r.new_admin, f.epoch());
            if valid && first {
                applied.push(r.clone());
            }
        }
    }
    // Every retired admin's operation at or after its activation epoch is ignored.
    for f in &facts {
        let retired = applied.iter().any(|r| {
            r.old_admin == f.author()
                && r.activation_epoch <= f.epoch()
                && admin_of(initial, &applied, f.epoch()) != f.author()
        });
        if retired && is_admin_op(f) && !state.ignored.contains(&f.id()) {
            v.push(format!(
                "retired admin's operation {} at epoch {} took effect",
                f.id(),
                f.epoch()
            ));
        }
    }
    let top = state.current_epoch().0;
    for ep in 0..=top {
        let ours = admin_of(initial, &applied, Epoch(ep));
        if state.admin_at(Epoch(ep)) != Some(ours) {
            v.push(format!(
                "reducer's admin at epoch {ep} differs from the journal's chain"
            ));
            break;
        }
    }
    let _ = ledger;
    v
}

/// The writes a data fact supersedes (none for other facts).
fn supersedes(p: &Payload) -> &[FactId] {
    match p {
        Payload::Data(DataOp::Put(x)) => &x.supersedes,
        Payload::Data(DataOp::Delete(x)) => &x.supersedes,
        Payload::Data(DataOp::CachePut(x)) => &x.supersedes,
        _ => &[],
    }
}
