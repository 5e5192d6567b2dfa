//! Tells people their jobs finished: the mailer sends each job's completion email over SMTP
//! from the store's notifications, retrying with backoff, so no email is lost in a crash.
//!
//! Delivery is at least once: a mailer that dies after the server took a message but before
//! it was marked sent makes the next mailer send it again, with the same `Message-ID`.

pub mod mailer;
pub mod message;

pub use mailer::{ConfigError, Mailer, MailerConfig, Pass, SendError, TlsMode};
pub use message::{compose, message_id, ComposeError};
