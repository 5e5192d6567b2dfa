//! sluice-worker (work in progress).
