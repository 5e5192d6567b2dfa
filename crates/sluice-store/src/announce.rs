//! The store's announcement hook: every method that changes a job's state or event log names
//! the jobs it changed once its transaction is committed, so no caller can forget to.

use crate::outbox::OutboxMessage;
use crate::Store;
use sluice_core::RequestId;
use std::fmt;
use std::sync::Arc;

/// Told of every job whose state or event log a [`Store`] method changed, after the change is
/// committed (so a reader it wakes sees the change). Called on the caller's task, once per
/// changed job: it must not block or wait (hand the id on, e.g. to an event bus or a channel).
pub trait Announce: Send + Sync {
    /// The job `id` of `tenant` changed state or gained events.
    fn changed(&self, id: RequestId, tenant: &str);
}

/// Any `Fn(RequestId, &str)` announces, e.g. `move |id, tenant: &str| bus.changed(id, tenant)`.
impl<F> Announce for F
where
    F: Fn(RequestId, &str) + Send + Sync,
{
    fn changed(&self, id: RequestId, tenant: &str) {
        self(id, tenant)
    }
}

/// The hook a store holds, if any; clones share it.
#[derive(Clone, Default)]
pub(crate) struct Announcer(Option<Arc<dyn Announce>>);

impl fmt::Debug for Announcer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Announcer(set)"
        } else {
            "Announcer(none)"
        })
    }
}

impl Announcer {
    /// Announce one changed job.
    pub(crate) fn one(&self, id: RequestId, tenant: &str) {
        if let Some(hook) = &self.0 {
            hook.changed(id, tenant);
        }
    }

    /// Announce each of the changed jobs, in order.
    pub(crate) fn all<'a>(&self, jobs: impl IntoIterator<Item = (RequestId, &'a str)>) {
        if let Some(hook) = &self.0 {
            for (id, tenant) in jobs {
                hook.changed(id, tenant);
            }
        }
    }
}

impl Store {
    /// This store, announcing every job it changes to `hook` (see [`Announce`]) from now on.
    /// Clones of the returned store share the hook; it replaces any hook set before, and
    /// clones taken before this call keep what they had.
    pub fn announcing(mut self, hook: Arc<dyn Announce>) -> Store {
        self.announcer = Announcer(Some(hook));
        self
    }

    /// Announce the jobs of lane messages a state change queued.
    pub(crate) fn announce_messages<'a>(&self, messages: impl Iterator<Item = &'a OutboxMessage>) {
        self.announcer
            .all(messages.map(|m| (m.job.request_id, m.job.tenant.as_str())));
    }

    /// Announce jobs a method answers with their tenants.
    pub(crate) fn announce_all(&self, jobs: &[(RequestId, String)]) {
        self.announcer
            .all(jobs.iter().map(|(id, tenant)| (*id, tenant.as_str())));
    }
}
