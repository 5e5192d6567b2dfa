//! The mailer loop: claim due notifications (a finished job's or an ended batch's) under a
//! lease, send each over SMTP, and mark it sent, or failed with an exponential backoff, or
//! failed for good once retries are spent.

use crate::link::{LinkError, LinkSigner, DEFAULT_TTL_SECS};
use crate::message::{compose, describe, ComposeError, Links};
use futures::StreamExt;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde::Deserialize;
use sluice_core::{RetryDecision, RetryPolicy};
use sluice_store::{Notification, Store, StoreError};
use std::fmt;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest wait between two tries of one email, before jitter.
const MAX_BACKOFF_SECS: f64 = 600.0;
/// Extra delay drawn as a fraction of the backoff, so mailers that failed together spread out.
const JITTER: f64 = 0.25;
/// A send is not started with less than this left of its lease: it could finish after
/// another mailer took the row over, and the person would get the email twice.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Shortest lease that leaves time to send after [`LEASE_MARGIN`].
const MIN_LEASE_SECS: f64 = 10.0;

/// How the connection to the SMTP server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain text: only for a relay on the same host or network.
    None,
    /// Connect in plain text, then require an upgrade with `STARTTLS` (port 587).
    Starttls,
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
}

impl TlsMode {
    fn default_port(self) -> u16 {
        match self {
            TlsMode::None => 25,
            TlsMode::Starttls => 587,
            TlsMode::Tls => 465,
        }
    }
}

/// Where and how completion emails are sent.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailerConfig {
    pub smtp_host: String,
    /// Defaults by `tls`: 25, 587 or 465.
    pub smtp_port: Option<u16>,
    pub tls: TlsMode,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sender, e.g. `Sluice <sluice@example.com>`; its domain also names the Message-IDs.
    pub from: String,
    /// Where people reach the API; a job's email links to its result page
    /// `{public_base_url}/r/{id}?exp=..&sig=..` (and names `GET /v1/jobs/{id}`), a batch's to
    /// `{public_base_url}/v1/batches/{id}` and its files' content.
    pub public_base_url: String,
    /// The secret that signs result-page links, at least 32 bytes. Every mailer and every API
    /// node must have the same one (the nodes check what the mailers signed); a [`Mailer`]
    /// needs it. When it is unset, the `sluice` binary fills in the deployment's own from the
    /// database (made once by the first process that needs it); `sluice dev` keeps one beside
    /// its data file.
    pub link_secret: Option<String>,
    /// How long an emailed result-page link opens the page, in seconds (default a week).
    pub link_ttl_secs: u64,
    /// Sends tried before an email is given up on.
    pub max_attempts: u32,
    /// Wait after the first failed send, in seconds; doubles per failure up to 10 minutes.
    pub backoff_base_secs: f64,
    /// Notifications claimed at once.
    pub batch_size: u32,
    /// Sends in flight at once.
    pub concurrency: u32,
    /// Wait between polls when nothing is due, in seconds.
    pub poll_interval_secs: f64,
    /// How long a claimed notification is held; after that another mailer may send it.
    pub lease_secs: f64,
    /// Limit on each exchange with the SMTP server, in seconds.
    pub timeout_secs: f64,
}

impl Default for MailerConfig {
    fn default() -> Self {
        Self {
            smtp_host: "localhost".into(),
            smtp_port: None,
            tls: TlsMode::Starttls,
            username: None,
            password: None,
            from: "Sluice <sluice@localhost>".into(),
            public_base_url: "http://127.0.0.1:8080".into(),
            link_secret: None,
            link_ttl_secs: DEFAULT_TTL_SECS,
            max_attempts: 8,
            backoff_base_secs: 5.0,
            batch_size: 50,
            concurrency: 4,
            poll_interval_secs: 1.0,
            lease_secs: 60.0,
            timeout_secs: 30.0,
        }
    }
}

impl fmt::Debug for MailerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailerConfig")
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("from", &self.from)
            .field("public_base_url", &self.public_base_url)
            .field(
                "link_secret",
                &self.link_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("link_ttl_secs", &self.link_ttl_secs)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_base_secs", &self.backoff_base_secs)
            .field("batch_size", &self.batch_size)
            .field("concurrency", &self.concurrency)
            .field("poll_interval_secs", &self.poll_interval_secs)
            .field("lease_secs", &self.lease_secs)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("mailer.smtp_host must not be empty")]
    NoHost,
    #[error(
        "mailer.from {from:?} is not an email address like `Sluice <sluice@example.com>`: {source}"
    )]
    BadFrom {
        from: String,
        source: lettre::address::AddressError,
    },
    #[error("mailer.public_base_url {0:?} must be an http:// or https:// URL")]
    BadBaseUrl(String),
    #[error(
        "mail.link_secret is not set: completion emails link to a signed result page, and the \
         mailers and API nodes must share the secret that signs it; set it (the same on every \
         node) to at least 32 random bytes, e.g. `openssl rand -base64 32`, in [mail] or \
         SLUICE_MAIL__LINK_SECRET"
    )]
    NoLinkSecret,
    #[error("mail.link_secret: {0}")]
    LinkSecret(#[from] LinkError),
    #[error("mailer.username and mailer.password must be set together")]
    HalfCredentials,
    #[error("mailer.{0} must be at least 1")]
    Zero(&'static str),
    #[error("mailer.{0} must be a positive number of seconds, got {1}")]
    BadSeconds(&'static str, f64),
    #[error("mailer.lease_secs must be at least {min} s, got {0}", min = MIN_LEASE_SECS)]
    LeaseTooShort(f64),
    #[error("mailer.smtp_host {host:?} cannot be used for TLS: {source}")]
    Tls {
        host: String,
        source: lettre::transport::smtp::Error,
    },
}

impl MailerConfig {
    /// Check everything that can be checked before the first send.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.smtp_host.trim().is_empty() {
            return Err(ConfigError::NoHost);
        }
        self.sender()?;
        let url = self.public_base_url.as_str();
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        if !rest.is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace)) {
            return Err(ConfigError::BadBaseUrl(self.public_base_url.clone()));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err(ConfigError::HalfCredentials);
        }
        // A missing secret is refused where links are signed or checked (the mailer, an API
        // node), not here: `sluice dev` loads the config first, then fills in its own secret.
        if let Some(secret) = &self.link_secret {
            LinkSigner::new(secret)?;
        }
        if self.link_ttl_secs == 0 {
            return Err(ConfigError::Zero("link_ttl_secs"));
        }
        for (name, n) in [
            ("max_attempts", self.max_attempts),
            ("batch_size", self.batch_size),
            ("concurrency", self.concurrency),
        ] {
            if n == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        for (name, secs) in [
            ("backoff_base_secs", self.backoff_base_secs),
            ("poll_interval_secs", self.poll_interval_secs),
            ("lease_secs", self.lease_secs),
            ("timeout_secs", self.timeout_secs),
        ] {
            if Duration::try_from_secs_f64(secs).map_or(true, |d| d.is_zero()) {
                return Err(ConfigError::BadSeconds(name, secs));
            }
        }
        if self.lease_secs < MIN_LEASE_SECS {
            return Err(ConfigError::LeaseTooShort(self.lease_secs));
        }
        Ok(())
    }

    fn sender(&self) -> Result<Mailbox, ConfigError> {
        self.from
            .trim()
            .parse()
            .map_err(|source| ConfigError::BadFrom {
                from: self.from.clone(),
                source,
            })
    }

    /// What signs the result-page links; also what API nodes check them with. Without
    /// `link_secret` this is [`ConfigError::NoLinkSecret`], which stops a mailer at start.
    pub fn signer(&self) -> Result<LinkSigner, ConfigError> {
        let secret = self
            .link_secret
            .as_deref()
            .ok_or(ConfigError::NoLinkSecret)?;
        Ok(LinkSigner::new(secret)?)
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            base_delay_secs: self.backoff_base_secs.min(MAX_BACKOFF_SECS),
            max_delay_secs: MAX_BACKOFF_SECS,
            max_attempts: self.max_attempts,
            jitter: JITTER,
            ..RetryPolicy::default()
        }
    }

    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, ConfigError> {
        let host = self.smtp_host.trim();
        let tls = |required: bool| {
            TlsParameters::new(host.to_owned())
                .map(|p| {
                    if required {
                        Tls::Required(p)
                    } else {
                        Tls::Wrapper(p)
                    }
                })
                .map_err(|source| ConfigError::Tls {
                    host: host.to_owned(),
                    source,
                })
        };
        let tls = match self.tls {
            TlsMode::None => Tls::None,
            TlsMode::Starttls => tls(true)?,
            TlsMode::Tls => tls(false)?,
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(self.smtp_port.unwrap_or(self.tls.default_port()))
            .tls(tls)
            .timeout(Some(secs(self.timeout_secs)));
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(builder.build())
    }
}

/// Seconds from a validated config.
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::from_secs(1))
}

/// Why one email was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Compose(#[from] ComposeError),
    #[error("SMTP: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    /// The send outlasted the mailer's lease on the email. The server may have taken it.
    #[error("SMTP: the send did not finish within the notification's lease")]
    Timeout,
}

impl SendError {
    /// True when sending the same message again cannot succeed: a bad address, or a
    /// 5xx answer from the server (e.g. no such mailbox).
    pub fn is_permanent(&self) -> bool {
        match self {
            SendError::Compose(_) => true,
            SendError::Smtp(e) => e.is_permanent(),
            SendError::Timeout => false,
        }
    }
}

/// What one pass over the due notifications did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub claimed: usize,
    pub sent: usize,
    /// Failed and scheduled for another try.
    pub retrying: usize,
    /// Failed for good.
    pub failed: usize,
    /// Claimed but not tried (lease nearly over, or shutting down); given back.
    pub released: usize,
}

/// Sends completion emails from the store's notifications.
pub struct Mailer {
    store: Store,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    config: MailerConfig,
    from: Mailbox,
    retry: RetryPolicy,
    signer: LinkSigner,
}

enum Outcome {
    Sent,
    Retrying,
    Failed,
    Released,
}

impl Mailer {
    /// Validate the configuration and set up the SMTP transport; nothing connects yet.
    pub fn new(store: Store, config: MailerConfig) -> Result<Mailer, ConfigError> {
        config.validate()?;
        if config.username.is_some() && config.tls == TlsMode::None {
            tracing::warn!(
                message = "mailer sends SMTP credentials without TLS",
                host = %config.smtp_host
            );
        }
        Ok(Mailer {
            store,
            transport: config.transport()?,
            from: config.sender()?,
            retry: config.retry_policy(),
            signer: config.signer()?,
            config,
        })
    }

    pub fn config(&self) -> &MailerConfig {
        &self.config
    }

    /// Send due emails until `shutdown`; a send in progress is finished first.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(message = "mailer started", config = ?self.config);
        let idle = secs(self.config.poll_interval_secs);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let wait = match self.run_once(&shutdown).await {
                // A full batch: more are probably due.
                Ok(pass) if pass.claimed >= self.config.batch_size as usize => Duration::ZERO,
                Ok(_) => idle,
                Err(error) => {
                    tracing::warn!(message = "mailer could not read notifications", %error);
                    idle
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        tracing::info!(message = "mailer stopped");
    }

    /// Claim one batch of due notifications and send them. Sends stop being started once
    /// `shutdown` fires; what was not tried is given back for the next mailer.
    pub async fn run_once(&self, shutdown: &CancellationToken) -> Result<Pass, StoreError> {
        let lease = secs(self.config.lease_secs);
        // Counted from before the claim, so the local deadline is never later than the row's.
        let deadline = Instant::now() + lease;
        let claimed = self
            .store
            .claim_notifications(i64::from(self.config.batch_size), lease)
            .await?;
        let mut pass = Pass {
            claimed: claimed.len(),
            ..Pass::default()
        };
        if claimed.is_empty() {
            return Ok(pass);
        }
        let mut untried = Vec::new();
        let mut results = futures::stream::iter(claimed)
            .map(|n| async move {
                let outcome = self.handle(&n, deadline, shutdown).await;
                (n.id, outcome)
            })
            .buffer_unordered(self.config.concurrency as usize);
        while let Some((id, outcome)) = results.next().await {
            match outcome {
                Ok(Outcome::Sent) => pass.sent += 1,
                Ok(Outcome::Retrying) => pass.retrying += 1,
                Ok(Outcome::Failed) => pass.failed += 1,
                Ok(Outcome::Released) => untried.push(id),
                // The row stays claimed and is retried once its lease passes.
                Err(error) => {
                    tracing::warn!(message = "could not record a notification's outcome", notification = id, %error)
                }
            }
        }
        pass.released = untried.len();
        self.store.release_notifications(&untried).await?;
        Ok(pass)
    }

    async fn handle(
        &self,
        n: &Notification,
        deadline: Instant,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, StoreError> {
        if shutdown.is_cancelled() || Instant::now() + LEASE_MARGIN >= deadline {
            return Ok(Outcome::Released);
        }
        // Past the lease another mailer may be sending the same email: stop before it.
        let sent =
            tokio::time::timeout_at((deadline - Duration::from_secs(1)).into(), self.deliver(n))
                .await
                .unwrap_or(Err(SendError::Timeout));
        match sent {
            Ok(()) => {
                self.store.notification_sent(n.id).await?;
                tracing::info!(message = "completion email sent", about = %describe(n), attempts = n.attempts);
                Ok(Outcome::Sent)
            }
            Err(error) => {
                let attempts = u32::try_from(n.attempts).unwrap_or(0);
                let decision =
                    self.retry
                        .decide(attempts, !error.is_permanent(), rand::random::<f64>());
                let text = error.to_string();
                match decision {
                    RetryDecision::RetryAfter(delay) => {
                        tracing::warn!(message = "completion email not sent; will retry", about = %describe(n), attempts, retry_in = ?delay, %error);
                        self.store
                            .notification_failed(n.id, &text, Some(delay))
                            .await?;
                        Ok(Outcome::Retrying)
                    }
                    RetryDecision::Dead => {
                        tracing::error!(message = "completion email given up", about = %describe(n), attempts, %error);
                        self.store.notification_failed(n.id, &text, None).await?;
                        Ok(Outcome::Failed)
                    }
                }
            }
        }
    }

    /// Compose and send one notification's email, without recording anything in the store.
    pub async fn deliver(&self, n: &Notification) -> Result<(), SendError> {
        // The link's life starts at each send: a retried email's link is as long-lived.
        let ttl = i64::try_from(self.config.link_ttl_secs).unwrap_or(i64::MAX);
        let links = Links {
            base_url: &self.config.public_base_url,
            signer: &self.signer,
            expires_at: chrono::Utc::now().timestamp().saturating_add(ttl),
        };
        let message = compose(n, &self.from, &links)?;
        self.transport.send(message).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SECRET: &str = "a test secret of at least 32 bytes";

    fn valid() -> MailerConfig {
        MailerConfig {
            tls: TlsMode::None,
            link_secret: Some(SECRET.into()),
            ..MailerConfig::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_match_the_design() {
        let c = MailerConfig::default();
        c.validate().unwrap();
        // But no default secret: mailers and API nodes must share theirs.
        assert!(matches!(c.signer(), Err(ConfigError::NoLinkSecret)));
        assert_eq!(c.link_ttl_secs, 7 * 24 * 3600);
        assert_eq!(c.public_base_url, "http://127.0.0.1:8080");
        assert_eq!(
            (c.max_attempts, c.backoff_base_secs, c.lease_secs),
            (8, 5.0, 60.0)
        );
        let p = c.retry_policy();
        assert_eq!(p.min_backoff(1), Duration::from_secs(5));
        assert_eq!(p.min_backoff(2), Duration::from_secs(10));
        assert_eq!(p.min_backoff(20), Duration::from_secs(600));
        assert!(p.backoff(20, 0.99) <= Duration::from_secs(750));
        assert_eq!(p.decide(8, true, 0.5), RetryDecision::Dead);
        assert!(matches!(
            p.decide(7, true, 0.5),
            RetryDecision::RetryAfter(_)
        ));
        assert_eq!(p.decide(1, false, 0.5), RetryDecision::Dead);
    }

    #[test]
    fn config_parses_with_lowercase_tls_and_rejects_unknown_fields() {
        let c: MailerConfig = serde_json_like(
            r#"{"smtp_host": "smtp.example.com", "tls": "tls", "from": "a@example.com"}"#,
        )
        .unwrap();
        assert_eq!(c.tls, TlsMode::Tls);
        assert_eq!(c.max_attempts, 8);
        let bad = serde_json_like(r#"{"smtp_hots": "x"}"#).unwrap_err();
        assert!(bad.contains("unknown field"), "{bad}");
        let bad = serde_json_like(r#"{"tls": "ssl"}"#).unwrap_err();
        assert!(bad.contains("unknown variant"), "{bad}");
    }

    fn serde_json_like(s: &str) -> Result<MailerConfig, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn bad_configs_get_clear_errors() {
        let err = MailerConfig {
            from: "not an address".into(),
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.to_string().contains("mailer.from \"not an address\""),
            "{err}"
        );

        let err = MailerConfig {
            public_base_url: "127.0.0.1:8080".into(),
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert!(matches!(err, ConfigError::BadBaseUrl(_)), "{err}");

        let err = MailerConfig {
            username: Some("u".into()),
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert!(matches!(err, ConfigError::HalfCredentials));

        let err = MailerConfig {
            max_attempts: 0,
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.to_string(), "mailer.max_attempts must be at least 1");

        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = MailerConfig {
                backoff_base_secs: bad,
                ..valid()
            }
            .validate()
            .unwrap_err();
            assert!(matches!(
                err,
                ConfigError::BadSeconds("backoff_base_secs", _)
            ));
        }

        let err = MailerConfig {
            lease_secs: 3.0,
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert!(matches!(err, ConfigError::LeaseTooShort(_)), "{err}");

        let err = MailerConfig {
            link_secret: Some("too short".into()),
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "mail.link_secret: the result-link secret is 9 bytes; at least 32 are needed \
             (e.g. `openssl rand -base64 32`)"
        );
        let err = MailerConfig {
            link_secret: None,
            ..valid()
        }
        .signer()
        .unwrap_err();
        assert!(err.to_string().contains("openssl rand"), "{err}");
    }

    #[test]
    fn debug_redacts_the_password() {
        let c = MailerConfig {
            username: Some("mailer".into()),
            password: Some("hunter2".into()),
            ..valid()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("[redacted]") && shown.contains("mailer"));
    }

    #[test]
    fn every_tls_mode_builds_a_transport() {
        for tls in [TlsMode::None, TlsMode::Starttls, TlsMode::Tls] {
            let c = MailerConfig {
                tls,
                smtp_host: "smtp.example.com".into(),
                ..MailerConfig::default()
            };
            c.transport().unwrap();
        }
    }
}
