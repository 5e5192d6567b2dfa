//! SQS lanes: one queue per lane under a prefix (work in progress).
