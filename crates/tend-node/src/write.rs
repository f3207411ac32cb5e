//! Data writes as one batch: every write of a [`WritePlan`] is signed against the device's
//! application state plus the writes before it in the same plan (a put supersedes the put
//! just planned for its key; appends to a log take consecutive clock values), and
//! [`WritePlan::commit`] stores them all in one transaction, or none.
//!
//! A single `tend put` is a plan of one write; `DataRequest::Batch` is a plan of many.
//! Both go through the device's [`WriteQueue`], whose group commit puts the writes of
//! concurrent callers in one plan and one transaction.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};

use serde_bytes::ByteBuf;
use tend_core::app::{
    check_key, check_name, Append, CachePut, Delete, LogCursor, Put, Space, Trim, Value,
    INLINE_VALUE_MAX,
};
use tend_core::maintenance::{BlobTombstone, MaintenanceFact};
use tend_core::{
    AppState, ContentId, DataOp, Epoch, FactFormat, FactId, JournalNamespace, Payload,
    UnsignedFact, VerifiedFact,
};
use tend_crypto::device::DeviceKey;
use tend_store::Store;

use crate::data_request::{check, check_write, DataRequest, Written, MAX_VALUE_BYTES};
use crate::error::DeviceError;

/// What writing needs of a device: the store it reads and commits to, the key it signs
/// with, and the journal it writes to. [`crate::device::Device`] is one; writes see
/// nothing else of it.
pub trait WriteTarget {
    /// The store plans read and commit to.
    fn store(&self) -> &Store;
    /// The key the facts are signed with.
    fn key(&self) -> &DeviceKey;
    /// The journal written to (read at each use: a device that joins an authority
    /// changes it).
    fn namespace(&self) -> JournalNamespace;
}

type KeyOf = (Space, String, String);

/// Below this many facts a plan signs on the calling thread: starting threads costs more
/// than it saves.
const PARALLEL_SIGN_MIN: usize = 32;

/// Threads a plan signs on: every core, up to 16. Asked once: the answer reads the
/// cgroup limits on Linux, which showed in profiles of small group commits.
fn signing_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(16)))
}

/// The wall clock in milliseconds since the Unix epoch, as timed facts carry it (a clock
/// set before 1970 reads as 0: the time only orders facts for sync).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes being prepared on a device; nothing is stored before [`WritePlan::commit`].
///
/// Facts are planned unsigned and signed together, on every core, when the plan commits or
/// when a later write needs the id of an earlier one (a put superseding the put just
/// planned for its key): a batch of appends or of distinct keys is signed in parallel.
pub struct WritePlan<'d> {
    device: &'d dyn WriteTarget,
    state: Arc<AppState>,
    epoch: Epoch,
    /// The format the plan's facts are written in: the newest every member reads.
    format: FactFormat,
    /// The fact this plan wrote last for a key, by its index in the plan.
    heads: HashMap<KeyOf, usize>,
    /// The next clock value of the logs this plan appended to.
    seqs: HashMap<String, u64>,
    /// The plan's facts signed so far (indices `0..signed.len()`)...
    signed: Vec<VerifiedFact>,
    /// ...and those still to sign, after them.
    unsigned: Vec<UnsignedFact>,
    written: Vec<PlannedWrite>,
    /// How to undo the map changes since the last [`WritePlan::mark`].
    undo: Vec<Undo>,
}

/// A fact admission refused: its index in the plan (`usize::MAX` if it is not one of the
/// plan's) and why.
type Refused = (usize, String);

/// What one write made, by the index of its fact in the plan.
struct PlannedWrite {
    index: usize,
    cursor: bool,
    blob: Option<ContentId>,
}

enum Undo {
    Head(KeyOf, Option<usize>),
    Seq(String, Option<u64>),
}

/// A point of a plan to roll back to: see [`WritePlan::mark`].
#[derive(Clone, Copy, Debug)]
pub struct PlanMark {
    facts: usize,
    written: usize,
}

/// A head a new write of a key supersedes: stored, or planned earlier in this plan.
#[derive(Clone, Copy)]
enum Head {
    Stored(Epoch, FactId),
    Planned(usize),
}

fn invalid(e: impl std::fmt::Display) -> DeviceError {
    DeviceError::InvalidInput(e.to_string())
}

impl<'d> WritePlan<'d> {
    /// A plan against the device's current state and epoch.
    pub fn new(device: &'d dyn WriteTarget) -> Result<Self, DeviceError> {
        let ns = device.namespace();
        let maintenance = device.store().maintenance_state(ns)?;
        Ok(Self {
            device,
            state: device.store().app_state(ns)?,
            epoch: maintenance.current_epoch(),
            format: maintenance.write_format(now_ms),
            heads: HashMap::new(),
            seqs: HashMap::new(),
            signed: Vec::new(),
            unsigned: Vec::new(),
            written: Vec::new(),
            undo: Vec::new(),
        })
    }

    /// How many facts the plan will store.
    pub fn len(&self) -> usize {
        self.signed.len() + self.unsigned.len()
    }

    /// Whether the plan holds no write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remembers the plan as it is now, so that [`WritePlan::rollback`] can drop the writes
    /// planned after it (group commit plans each caller's writes this way: one caller's
    /// bad write leaves the others' in the plan). Only the latest mark can be rolled back to.
    pub fn mark(&mut self) -> PlanMark {
        self.undo.clear();
        PlanMark {
            facts: self.len(),
            written: self.written.len(),
        }
    }

    /// Drops every write planned since `mark` (the latest [`WritePlan::mark`]); a blob a
    /// dropped put stored stays, content-addressed and unreferenced, for GC.
    pub fn rollback(&mut self, mark: PlanMark) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Head(k, Some(i)) => {
                    self.heads.insert(k, i);
                }
                Undo::Head(k, None) => {
                    self.heads.remove(&k);
                }
                Undo::Seq(l, Some(s)) => {
                    self.seqs.insert(l, s);
                }
                Undo::Seq(l, None) => {
                    self.seqs.remove(&l);
                }
            }
        }
        if mark.facts < self.signed.len() {
            self.signed.truncate(mark.facts);
            self.unsigned.clear();
        } else {
            self.unsigned.truncate(mark.facts - self.signed.len());
        }
        self.written.truncate(mark.written);
    }

    fn set_head(&mut self, key: KeyOf, index: usize) {
        let old = self.heads.insert(key.clone(), index);
        self.undo.push(Undo::Head(key, old));
    }

    fn set_seq(&mut self, log: &str, next: u64) {
        let old = self.seqs.insert(log.to_owned(), next);
        self.undo.push(Undo::Seq(log.to_owned(), old));
    }

    fn heads(&self, key: &KeyOf) -> Vec<Head> {
        match self.heads.get(key) {
            Some(i) => vec![Head::Planned(*i)],
            None => self
                .state
                .head_keys(key.0, &key.1, &key.2)
                .into_iter()
                .map(|(e, id)| Head::Stored(e, id))
                .collect(),
        }
    }

    /// The ids of `heads`, signing what the plan holds unsigned if one of them is planned.
    fn head_ids(&mut self, heads: &[Head]) -> Vec<FactId> {
        if heads
            .iter()
            .any(|h| matches!(h, Head::Planned(i) if *i >= self.signed.len()))
        {
            self.sign_pending();
        }
        heads
            .iter()
            .map(|h| match h {
                Head::Stored(_, id) => *id,
                Head::Planned(i) => self.signed[*i].id(),
            })
            .collect()
    }

    /// Signs every planned fact not signed yet, on every core for a large plan.
    fn sign_pending(&mut self) {
        let pending = std::mem::take(&mut self.unsigned);
        let key = self.device.key().signing_key();
        let format = self.format;
        let sign = move |f: UnsignedFact| f.sign_with(key, format);
        let threads = signing_threads();
        if threads < 2 || pending.len() < PARALLEL_SIGN_MIN {
            self.signed.extend(pending.into_iter().map(sign));
            return;
        }
        let per = pending.len().div_ceil(threads);
        let mut runs: Vec<Vec<UnsignedFact>> = Vec::with_capacity(threads);
        let mut rest = pending.into_iter();
        loop {
            let run: Vec<UnsignedFact> = rest.by_ref().take(per).collect();
            if run.is_empty() {
                break;
            }
            runs.push(run);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = runs
                .into_iter()
                .map(|run| s.spawn(move || run.into_iter().map(sign).collect::<Vec<_>>()))
                .collect();
            for h in handles {
                // Signing does not fail; a panic in a signing thread is a bug to surface.
                match h.join() {
                    Ok(signed) => self.signed.extend(signed),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
    }

    /// The payload of the fact at `index` of the plan.
    fn planned_payload(&self, index: usize) -> &Payload {
        match self.signed.get(index) {
            Some(f) => f.payload(),
            None => &self.unsigned[index - self.signed.len()].payload,
        }
    }

    fn plan_fact(&mut self, payload: Payload) -> usize {
        self.unsigned.push(UnsignedFact {
            namespace: self.device.namespace(),
            epoch: self.epoch,
            payload,
        });
        self.len() - 1
    }

    fn plan_op(&mut self, op: DataOp) -> Result<usize, DeviceError> {
        op.check().map_err(invalid)?;
        Ok(self.plan_fact(Payload::Data(op)))
    }

    /// The payload of a head: from this plan, or from the store.
    fn payload_of(&self, head: Head) -> Result<Option<Payload>, DeviceError> {
        let (epoch, id) = match head {
            Head::Planned(i) => return Ok(Some(self.planned_payload(i).clone())),
            Head::Stored(epoch, id) => (epoch, id),
        };
        let stored = self
            .device
            .store()
            .get(self.device.namespace(), epoch, &id)?;
        stored
            .map(|s| s.author_payload().map(|(_, p)| p))
            .transpose()
            .map_err(|e| invalid(format!("stored fact {id}: {e}")))
    }

    /// The blobs the given heads' values live in: overwriting them tombstones them.
    fn tombstone_blobs(
        &mut self,
        heads: &[Head],
        keep: Option<ContentId>,
    ) -> Result<(), DeviceError> {
        for h in heads {
            if let Some(Payload::Data(DataOp::Put(p))) = self.payload_of(*h)? {
                if let Some(cid) = p.value.blob().filter(|c| Some(*c) != keep) {
                    self.plan_fact(Payload::Maintenance(MaintenanceFact::BlobTombstone(
                        BlobTombstone { cid },
                    )));
                }
            }
        }
        Ok(())
    }

    /// `put(collection, key, value)`, superseding every head of the key (so the device
    /// reads its own latest write). A value above [`INLINE_VALUE_MAX`] goes to the blob
    /// store now (content-addressed: harmless if the plan is dropped) and the fact names it.
    pub fn put(&mut self, collection: &str, key: &str, value: &[u8]) -> Result<(), DeviceError> {
        check_name("collection name", collection).map_err(invalid)?;
        check_key(key).map_err(invalid)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(invalid(format!(
                "the value is {} bytes, the limit is {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
        let k = (Space::Collection, collection.to_owned(), key.to_owned());
        let heads = self.heads(&k);
        let supersedes = self.head_ids(&heads);
        let stored = if value.len() > INLINE_VALUE_MAX {
            let cid = self
                .device
                .store()
                .put_blob(tend_core::ids::CODEC_RAW, value)?;
            Value::Blob {
                cid,
                len: value.len() as u64,
            }
        } else {
            Value::Inline(ByteBuf::from(value.to_vec()))
        };
        let blob = stored.blob();
        let index = self.plan_op(DataOp::Put(Put {
            collection: collection.into(),
            key: key.into(),
            value: stored,
            supersedes,
        }))?;
        self.tombstone_blobs(&heads, blob)?;
        self.set_head(k, index);
        self.written.push(PlannedWrite {
            index,
            cursor: false,
            blob,
        });
        Ok(())
    }

    /// `delete(collection, key)`; fails if the key is absent.
    pub fn delete(&mut self, collection: &str, key: &str) -> Result<(), DeviceError> {
        check_name("collection name", collection).map_err(invalid)?;
        check_key(key).map_err(invalid)?;
        let k = (Space::Collection, collection.to_owned(), key.to_owned());
        let present = match self.heads.get(&k) {
            Some(i) => !matches!(self.planned_payload(*i), Payload::Data(DataOp::Delete(_))),
            None => self.state.get(collection, key).is_some(),
        };
        if !present {
            return Err(DeviceError::NotFound(format!(
                "{collection}/{key} is absent: nothing to delete"
            )));
        }
        let heads = self.heads(&k);
        let supersedes = self.head_ids(&heads);
        let index = self.plan_op(DataOp::Delete(Delete {
            collection: collection.into(),
            key: key.into(),
            supersedes,
        }))?;
        self.tombstone_blobs(&heads, None)?;
        self.set_head(k, index);
        self.written.push(PlannedWrite {
            index,
            cursor: false,
            blob: None,
        });
        Ok(())
    }

    /// Appends an entry to a log, after every entry this device has seen in it.
    pub fn append(&mut self, log: &str, data: &[u8]) -> Result<(), DeviceError> {
        let seq = match self.seqs.get(log) {
            Some(s) => *s,
            None => self.state.next_seq(log),
        };
        let index = self.plan_op(DataOp::Append(Append {
            log: log.into(),
            seq,
            data: ByteBuf::from(data.to_vec()),
        }))?;
        self.set_seq(log, seq + 1);
        self.written.push(PlannedWrite {
            index,
            cursor: true,
            blob: None,
        });
        Ok(())
    }

    /// Drops the entries of a log below a cursor.
    pub fn trim(&mut self, log: &str, before: LogCursor) -> Result<(), DeviceError> {
        let index = self.plan_op(DataOp::Trim(Trim {
            log: log.into(),
            before,
        }))?;
        self.written.push(PlannedWrite {
            index,
            cursor: false,
            blob: None,
        });
        Ok(())
    }

    /// Writes a replicated cache entry, computed at the current epoch.
    pub fn cache_put(&mut self, key: &str, value: &[u8]) -> Result<(), DeviceError> {
        let k = (Space::Cache, String::new(), key.to_owned());
        let heads = self.heads(&k);
        let supersedes = self.head_ids(&heads);
        let index = self.plan_op(DataOp::CachePut(CachePut {
            key: key.into(),
            value: ByteBuf::from(value.to_vec()),
            supersedes,
        }))?;
        self.set_head(k, index);
        self.written.push(PlannedWrite {
            index,
            cursor: false,
            blob: None,
        });
        Ok(())
    }

    /// Signs what is left and stores every planned fact in one transaction; what each
    /// write made, in order.
    pub fn commit(self) -> Result<Vec<Written>, DeviceError> {
        let (written, rejected) = self.commit_parts()?;
        if let Some((_, error)) = rejected.into_iter().next() {
            return Err(DeviceError::Rejected(error));
        }
        Ok(written)
    }

    /// Signs and stores the plan; what each write made, and the facts admission refused
    /// (by index in the plan, with why). The store admits each fact on its own: a refused
    /// fact is not written, the others are.
    fn commit_parts(mut self) -> Result<(Vec<Written>, Vec<Refused>), DeviceError> {
        self.sign_pending();
        // The store updates its application state in place (`Arc::make_mut`) unless
        // someone else holds it: let go of the plan's handle first, or every commit
        // copies the whole state (it showed in profiles as a BTreeMap clone per commit).
        drop(std::mem::take(&mut self.state));
        let report = self.device.store().insert_batch(&self.signed)?;
        let mut rejected = Vec::new();
        if !report.rejected.is_empty() {
            let index: HashMap<FactId, usize> = self
                .signed
                .iter()
                .enumerate()
                .map(|(i, f)| (f.id(), i))
                .collect();
            for r in &report.rejected {
                let at = index.get(&r.id).copied().unwrap_or(usize::MAX);
                rejected.push((at, r.error.to_string()));
            }
        }
        let written = self
            .written
            .iter()
            .map(|w| {
                let f = &self.signed[w.index];
                written(f, w.cursor.then(|| LogCursor::of(f)).flatten(), w.blob)
            })
            .collect();
        Ok((written, rejected))
    }
}

/// Adds one write request to a plan; reads are refused.
pub(crate) fn plan_request(p: &mut WritePlan<'_>, request: DataRequest) -> Result<(), DeviceError> {
    check_write(&request)?;
    match request {
        DataRequest::Put {
            collection,
            key,
            value,
        } => p.put(&collection, &key, &value.0),
        DataRequest::Delete { collection, key } => p.delete(&collection, &key),
        DataRequest::LogAppend { log, data } => p.append(&log, &data.0),
        DataRequest::LogTrim { log, before } => p.trim(&log, check(before.parse::<LogCursor>())?),
        DataRequest::CachePut { key, value } => p.cache_put(&key, &value.0),
        _ => Err(DeviceError::InvalidInput(
            "a batch holds writes only (put, delete, log_append, log_trim, cache_put)".into(),
        )),
    }
}

fn written(f: &VerifiedFact, cursor: Option<LogCursor>, blob: Option<ContentId>) -> Written {
    Written {
        id: f.id().to_string(),
        epoch: f.epoch().0,
        cursor: cursor.map(|c| c.to_string()),
        blob: blob.map(|c| c.to_string()),
    }
}

/// One caller's writes waiting for a group commit, and where its answer goes.
struct Job {
    ops: Vec<DataRequest>,
    answer: Answer,
}

/// What a group commit answers a caller.
pub type WriteResult = Result<Vec<Written>, DeviceError>;

/// Where a job's answer goes: a thread blocked in [`WriteQueue::submit_all`], or a task
/// awaiting [`WriteQueue::enqueue`]'s receiver (which holds no thread while it waits).
enum Answer {
    Thread(mpsc::Sender<Reply>),
    Task(tokio::sync::oneshot::Sender<WriteResult>),
}

/// What a thread waiting in [`WriteQueue::submit_all`] hears: its answer, or that it
/// leads now (the leader before it got all of its own answers and hands over rather than
/// keep committing others' groups while its caller waits).
enum Reply {
    Written(WriteResult),
    Lead,
}

impl Answer {
    fn send(self, result: WriteResult) {
        // A caller that gave up waiting has nobody to tell.
        let _ = match self {
            Answer::Thread(tx) => tx.send(Reply::Written(result)).map_err(drop),
            Answer::Task(tx) => tx.send(result).map_err(drop),
        };
    }
}

/// Group commit: writers that arrive while a commit runs wait in a queue, and the next
/// commit stores all of their writes in one transaction (one fsync for many callers).
///
/// There is no writer thread: the first caller to find no commit running leads, taking the
/// queue, committing it and answering everyone, until the queue is empty, or until its own
/// writes are answered and another waiting thread can take the lead over. A caller on an
/// async runtime ([`WriteQueue::enqueue`]) awaits its answer without a thread and, when it
/// must lead, leads on one blocking thread for the whole run of groups: the control socket
/// and the HTTP API do not park a blocking thread per write. Each caller's
/// writes are planned against the state plus the writes of the callers before it in the
/// group (as in one [`WritePlan`]); a caller whose write is refused when planned is
/// answered at once and rolled back from the plan, and the others commit without it.
/// Every caller is answered only after the transaction holding its facts has committed.
#[derive(Default)]
pub struct WriteQueue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    jobs: Vec<Job>,
    leading: bool,
    stats: GroupCommitStats,
}

/// What a device's group commit has done since it opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    /// Groups planned (each at most one transaction).
    pub groups: u64,
    /// Callers' writes (a batch counts once) in those groups.
    pub jobs: u64,
}

impl WriteQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the group commit has done so far.
    pub fn stats(&self) -> GroupCommitStats {
        self.lock().stats
    }

    /// Writes `ops` (planned in order, all or none) in the next group commit of `device`
    /// and returns what each made, once they are durable.
    pub fn submit(
        &self,
        device: &dyn WriteTarget,
        ops: Vec<DataRequest>,
    ) -> Result<Vec<Written>, DeviceError> {
        self.submit_all(device, vec![ops])
            .pop()
            .unwrap_or_else(|| Err(DeviceError::InvalidInput("nothing was written".into())))
    }

    /// Writes several callers' writes in the same group commit: each entry of `writes` is
    /// planned in order after the ones before it and succeeds or fails on its own (all or
    /// none within an entry); one answer per entry, once its facts are durable.
    pub fn submit_all(
        &self,
        device: &dyn WriteTarget,
        writes: Vec<Vec<DataRequest>>,
    ) -> Vec<WriteResult> {
        let mut waiting = Vec::with_capacity(writes.len());
        let mut q = self.lock();
        for ops in writes {
            let (answer, rx) = mpsc::channel();
            q.jobs.push(Job {
                ops,
                answer: Answer::Thread(answer),
            });
            waiting.push(rx);
        }
        let mut lead = !std::mem::replace(&mut q.leading, true);
        drop(q);
        let mut answers: Vec<Option<WriteResult>> = waiting.iter().map(|_| None).collect();
        loop {
            if lead {
                // Leads until this caller's own writes are answered, then hands over.
                self.lead(device, &|| {}, &mut || {
                    take_ready(&waiting, &mut answers);
                    answers.iter().all(Option::is_some)
                });
                lead = false;
            }
            // In order: the queue answers one caller's writes in the order they were
            // queued, and hands the lead to the first waiting write.
            for (rx, answer) in waiting.iter().zip(answers.iter_mut()) {
                if answer.is_some() {
                    continue;
                }
                match rx.recv() {
                    Ok(Reply::Written(r)) => *answer = Some(r),
                    Ok(Reply::Lead) => {
                        lead = true;
                        break;
                    }
                    Err(_) => *answer = Some(Err(group_lost())),
                }
            }
            if !lead {
                return answers.into_iter().flatten().collect();
            }
        }
    }

    /// Queues `ops` (planned in order, all or none) for the next group commit; the
    /// receiver gets what they made once they are durable. With `Some`, no commit was
    /// running and the caller must run the returned [`Leader`] on a thread that may block
    /// (dropping it unrun answers the queue with an error rather than stall it).
    ///
    /// ```no_run
    /// # async fn write(device: std::sync::Arc<tend_node::device::Device>, ops: Vec<tend_node::data::DataRequest>) {
    /// let (answer, leader) = device.write_queue().enqueue(ops);
    /// if let Some(leader) = leader {
    ///     let device = device.clone();
    ///     tokio::task::spawn_blocking(move || leader.run(&*device, &|| {}));
    /// }
    /// let written = answer.await;
    /// # }
    /// ```
    pub fn enqueue(
        self: &Arc<Self>,
        ops: Vec<DataRequest>,
    ) -> (tokio::sync::oneshot::Receiver<WriteResult>, Option<Leader>) {
        let (answer, rx) = tokio::sync::oneshot::channel();
        let mut q = self.lock();
        q.jobs.push(Job {
            ops,
            answer: Answer::Task(answer),
        });
        let must_lead = !std::mem::replace(&mut q.leading, true);
        let leader = must_lead.then(|| Leader {
            queue: Some(Arc::clone(self)),
        });
        (rx, leader)
    }

    /// Commits group after group until the queue is empty, then gives up the lead; calls
    /// `after_group` after each group's callers are answered. The caller holds the lead.
    /// Once `done` says the leading caller has its own answers, the lead passes to the
    /// first thread still waiting in the queue instead (a caller is not kept committing
    /// other writers' groups for as long as they keep writing); tasks cannot take it, so
    /// with only tasks waiting the leader goes on.
    fn lead(
        &self,
        device: &dyn WriteTarget,
        after_group: &dyn Fn(),
        done: &mut dyn FnMut() -> bool,
    ) {
        let mut q = self.lock();
        loop {
            if q.jobs.is_empty() {
                q.leading = false;
                return;
            }
            if done() && q.hand_over() {
                return;
            }
            let jobs = std::mem::take(&mut q.jobs);
            q.stats.groups += 1;
            q.stats.jobs += jobs.len() as u64;
            drop(q);
            // A panic while committing (or in `after_group`) drops the group's answer
            // senders (its callers get an error) and must not leave the queue without
            // a leader.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                commit_group(device, jobs);
                after_group();
            }));
            q = self.lock();
        }
    }
}

impl QueueState {
    /// Tells the first thread waiting in the queue that it leads now; `false` if no
    /// waiting thread could be told.
    fn hand_over(&self) -> bool {
        self.jobs.iter().any(|job| match &job.answer {
            Answer::Thread(tx) => tx.send(Reply::Lead).is_ok(),
            Answer::Task(_) => false,
        })
    }
}

/// Moves the answers that have arrived into `answers` (a hand-over cannot arrive while
/// this caller leads).
fn take_ready(waiting: &[mpsc::Receiver<Reply>], answers: &mut [Option<WriteResult>]) {
    for (rx, answer) in waiting.iter().zip(answers.iter_mut()) {
        if answer.is_none() {
            if let Ok(Reply::Written(r)) = rx.try_recv() {
                *answer = Some(r);
            }
        }
    }
}

/// The lead of a [`WriteQueue`] handed to an async caller by [`WriteQueue::enqueue`], to
/// run on a thread that may block.
#[must_use = "a queue whose leader is dropped unrun answers its writers with an error"]
pub struct Leader {
    queue: Option<Arc<WriteQueue>>,
}

impl Leader {
    /// Commits the queued writes of `device` (whose queue this is) group after group;
    /// `after_group` runs after each group's callers are answered.
    pub fn run(mut self, device: &dyn WriteTarget, after_group: &dyn Fn()) {
        if let Some(queue) = self.queue.take() {
            queue.lead(device, after_group, &mut || false);
        }
    }
}

impl Drop for Leader {
    /// A leader dropped unrun (its blocking task cancelled as the runtime shuts down)
    /// answers the waiting writers and frees the lead, so that nothing waits forever.
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            let mut q = queue.lock();
            let jobs = std::mem::take(&mut q.jobs);
            q.leading = false;
            drop(q);
            answer_all_failed(
                jobs,
                DeviceError::SharedCommit("the device stopped before committing this write".into()),
            );
        }
    }
}

/// The answer of a caller whose group's leader went away without answering it.
pub(crate) fn group_lost() -> DeviceError {
    DeviceError::SharedCommit("the commit of this write's group failed unexpectedly".into())
}

/// Times a group is planned again when the journal's epoch moved between planning and
/// the commit (a snapshot completed meanwhile), so that admission refused every fact.
const EPOCH_RETRIES: usize = 3;

/// Plans every job into one plan (dropping the jobs refused while planned), commits it,
/// and answers each job.
fn commit_group(device: &dyn WriteTarget, mut jobs: Vec<Job>) {
    for attempt in 0..=EPOCH_RETRIES {
        jobs = match commit_group_once(device, jobs, attempt < EPOCH_RETRIES) {
            Some(again) => again,
            None => return,
        };
    }
}

/// One attempt of [`commit_group`]: `None` once every job is answered, or the jobs to
/// plan again when `may_retry` and the epoch moved under the plan (admission refused all
/// of its facts, so nothing of the group was written).
fn commit_group_once(
    device: &dyn WriteTarget,
    jobs: Vec<Job>,
    may_retry: bool,
) -> Option<Vec<Job>> {
    let mut plan = match WritePlan::new(device) {
        Ok(p) => p,
        Err(e) => {
            answer_all_failed(jobs, e);
            return None;
        }
    };
    // Per planned job: the job, its facts and its writes in the plan.
    let mut planned = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mark = plan.mark();
        // Planned from a copy: the group may have to be planned again.
        let result = job
            .ops
            .iter()
            .try_for_each(|op| plan_request(&mut plan, op.clone()));
        match result {
            Ok(()) => planned.push((job, mark, plan.len(), plan.written.len())),
            Err(e) => {
                plan.rollback(mark);
                job.answer.send(Err(e));
            }
        }
    }
    if planned.is_empty() {
        return None;
    }
    let (facts, epoch) = (plan.len(), plan.epoch);
    let (written, rejected) = match plan.commit_parts() {
        Ok(r) => r,
        Err(e) => {
            let answers = planned.into_iter().map(|(job, ..)| job.answer);
            answer_all_failed_to(answers, e);
            return None;
        }
    };
    if may_retry && rejected.len() == facts {
        let now = device
            .store()
            .maintenance_state(device.namespace())
            .map(|s| s.current_epoch());
        if now.is_ok_and(|now| now != epoch) {
            return Some(planned.into_iter().map(|(job, ..)| job).collect());
        }
    }
    let mut written = written.into_iter();
    for (job, mark, facts_end, written_end) in planned {
        let mine: Vec<Written> = written.by_ref().take(written_end - mark.written).collect();
        let refused = rejected
            .iter()
            .find(|(i, _)| (mark.facts..facts_end).contains(i) || *i == usize::MAX);
        job.answer.send(match refused {
            Some((_, why)) => Err(DeviceError::Rejected(why.clone())),
            None => Ok(mine),
        });
    }
    None
}

fn answer_all_failed(jobs: Vec<Job>, e: DeviceError) {
    answer_all_failed_to(jobs.into_iter().map(|j| j.answer), e)
}

/// The first caller gets the error itself, the others a copy of its message (errors are
/// not `Clone`: they may hold an I/O error).
fn answer_all_failed_to(mut answers: impl Iterator<Item = Answer>, e: DeviceError) {
    let line = crate::error::error_line(&e);
    if let Some(first) = answers.next() {
        first.send(Err(e));
    }
    for a in answers {
        a.send(Err(DeviceError::SharedCommit(line.clone())));
    }
}
