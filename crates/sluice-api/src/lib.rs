//! sluice-api (work in progress).
