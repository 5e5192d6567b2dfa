//! Tells people what their jobs do: the event bus and hub carry every state change (and
//! streamed tokens) to WebSocket and SSE subscribers on any API node, and the mailer sends
//! each job's completion email over SMTP from the store's notifications, retrying with
//! backoff, so no email is lost in a crash.
//!
//! Delivery is at least once: a mailer that dies after the server took a message but before
//! it was marked sent makes the next mailer send it again, with the same `Message-ID`.

pub mod bus;
pub mod hub;
pub mod link;
pub mod mailer;
pub mod message;
pub mod send_queue;
#[cfg(feature = "testing")]
pub mod testing;

pub use bus::{BusError, BusMessage, EventBus};
pub use hub::{Hub, Outgoing, Poll, StreamsConfig, Subscription};
pub use link::{LinkError, LinkSigner, Refusal};
pub use mailer::{ConfigError, Mailer, MailerConfig, Pass, SendError, TlsMode};
pub use message::{compose, message_id, ComposeError, Links};
pub use send_queue::Frame;
