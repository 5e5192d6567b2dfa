//! Signed, expiring links to one job's read-only result page, `/r/{id}?exp=<unix>&sig=<mac>`:
//! an HMAC-SHA256 of the job id and expiry under a secret the mailers and API nodes share.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sluice_core::RequestId;
use std::fmt;
use std::sync::Arc;

/// Shortest secret accepted, in bytes: HMAC-SHA256's own block of strength.
pub const MIN_SECRET_BYTES: usize = 32;

/// How long an emailed link opens the page, by default: a week.
pub const DEFAULT_TTL_SECS: u64 = 7 * 24 * 3600;

/// The path prefix of result pages.
pub const PAGE_PREFIX: &str = "/r/";

/// Bound into every MAC, so a signature made for anything else with the same secret (should
/// it ever be reused) is never a valid link, and a later format can change the version.
const DOMAIN: &str = "sluice-result-link-v1";

/// A fresh secret: 32 bytes from the OS's generator, base64url (43 characters).
pub fn generate_secret() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error(
        "the result-link secret is {0} bytes; at least {min} are needed (e.g. `openssl rand -base64 32`)",
        min = MIN_SECRET_BYTES
    )]
    SecretTooShort(usize),
}

/// Why a link does not open its page. Both say nothing about the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed, altered, or signed with another secret.
    Forged,
    /// Genuine, but past its expiry.
    Expired,
}

/// Signs and checks result links; cheap to clone. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct LinkSigner {
    key: Arc<[u8]>,
}

impl fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkSigner([redacted])")
    }
}

impl LinkSigner {
    /// A signer keyed by `secret`'s bytes (surrounding whitespace, e.g. a file's newline, is
    /// not part of it).
    pub fn new(secret: &str) -> Result<Self, LinkError> {
        let secret = secret.trim();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(LinkError::SecretTooShort(secret.len()));
        }
        Ok(Self {
            key: Arc::from(secret.as_bytes()),
        })
    }

    fn mac(&self, id: RequestId, expires: i64) -> Hmac<Sha256> {
        // Any key length is valid for HMAC; `new_from_slice` cannot fail here.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        // Newline-separated, and both fields have a fixed alphabet without newlines, so no
        // two (id, expiry) pairs give the same message.
        mac.update(format!("{DOMAIN}\n{id}\n{expires}").as_bytes());
        mac
    }

    /// The signature of a link to job `id` that expires at `expires` (Unix seconds).
    pub fn sign(&self, id: RequestId, expires: i64) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(id, expires).finalize().into_bytes())
    }

    /// The page's path and query: `/r/{id}?exp={expires}&sig={signature}`.
    pub fn path(&self, id: RequestId, expires: i64) -> String {
        format!(
            "{PAGE_PREFIX}{id}?exp={expires}&sig={}",
            self.sign(id, expires)
        )
    }

    /// The page's full URL under `base_url` (with or without a trailing slash).
    pub fn url(&self, base_url: &str, id: RequestId, expires: i64) -> String {
        format!(
            "{}{}",
            base_url.trim_end_matches('/'),
            self.path(id, expires)
        )
    }

    /// The job a link's parts name, if this secret signed exactly them and `now` (Unix
    /// seconds) is not past the expiry. Only the canonical spelling of each part is accepted,
    /// so a link has one form and any changed byte breaks it.
    pub fn verify(
        &self,
        id: &str,
        expires: &str,
        signature: &str,
        now: i64,
    ) -> Result<RequestId, Refusal> {
        let parsed_id: RequestId = id.parse().map_err(|_| Refusal::Forged)?;
        let parsed_expires: i64 = expires.parse().map_err(|_| Refusal::Forged)?;
        if parsed_id.to_string() != id || parsed_expires.to_string() != expires {
            return Err(Refusal::Forged);
        }
        // Strict decoding: padding or stray trailing bits are refused, not ignored.
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| Refusal::Forged)?;
        // `verify_slice` compares in constant time: the answer's timing says nothing about
        // how much of a guessed signature was right.
        self.mac(parsed_id, parsed_expires)
            .verify_slice(&signature)
            .map_err(|_| Refusal::Forged)?;
        // Checked after the signature, so a forger learns nothing from the expiry.
        if now > parsed_expires {
            return Err(Refusal::Expired);
        }
        Ok(parsed_id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_750_000_000;

    fn signer() -> LinkSigner {
        LinkSigner::new(SECRET).unwrap()
    }

    fn id() -> RequestId {
        "0190b5e4-7d2a-7cc0-8000-000000000001".parse().unwrap()
    }

    /// The (id, exp, sig) of a link as the page's handler receives them.
    fn parts(path: &str) -> (String, String, String) {
        let rest = path.strip_prefix(PAGE_PREFIX).unwrap();
        let (id, query) = rest.split_once('?').unwrap();
        let (exp, sig) = query
            .strip_prefix("exp=")
            .unwrap()
            .split_once("&sig=")
            .unwrap();
        (id.into(), exp.into(), sig.into())
    }

    #[test]
    fn a_signed_link_opens_until_it_expires_and_not_after() {
        let s = signer();
        let (i, e, g) = parts(&s.path(id(), NOW + 60));
        assert_eq!(s.verify(&i, &e, &g, NOW), Ok(id()));
        assert_eq!(s.verify(&i, &e, &g, NOW + 60), Ok(id()));
        assert_eq!(s.verify(&i, &e, &g, NOW + 61), Err(Refusal::Expired));
    }

    #[test]
    fn another_job_another_expiry_or_another_secret_is_forged() {
        let s = signer();
        let (i, e, g) = parts(&s.path(id(), NOW + 60));
        let other = "0190b5e4-7d2a-7cc0-8000-000000000002";
        assert_eq!(s.verify(other, &e, &g, NOW), Err(Refusal::Forged));
        // Extending an expired link's life is a forgery, not an expiry.
        let later = (NOW + 3600).to_string();
        assert_eq!(s.verify(&i, &later, &g, NOW), Err(Refusal::Forged));
        let (_, _, expired_sig) = parts(&s.path(id(), NOW - 1));
        assert_eq!(
            s.verify(&i, &later, &expired_sig, NOW),
            Err(Refusal::Forged)
        );
        let wrong = LinkSigner::new("another secret of at least 32 bytes!").unwrap();
        assert_eq!(wrong.verify(&i, &e, &g, NOW), Err(Refusal::Forged));
    }

    #[test]
    fn other_spellings_of_the_same_link_are_refused() {
        let s = signer();
        let (i, e, g) = parts(&s.path(id(), NOW + 60));
        let upper = i.to_uppercase();
        assert_eq!(s.verify(&upper, &e, &g, NOW), Err(Refusal::Forged));
        assert_eq!(
            s.verify(&i, &format!("0{e}"), &g, NOW),
            Err(Refusal::Forged)
        );
        assert_eq!(
            s.verify(&i, &format!("+{e}"), &g, NOW),
            Err(Refusal::Forged)
        );
        assert_eq!(
            s.verify(&i, &e, &format!("{g}="), NOW),
            Err(Refusal::Forged)
        );
        assert_eq!(s.verify(&i, &e, "", NOW), Err(Refusal::Forged));
        assert_eq!(s.verify("", &e, &g, NOW), Err(Refusal::Forged));
        assert_eq!(s.verify(&i, "", &g, NOW), Err(Refusal::Forged));
    }

    #[test]
    fn short_secrets_are_refused_and_the_secret_is_never_shown() {
        assert_eq!(
            LinkSigner::new("short").unwrap_err(),
            LinkError::SecretTooShort(5)
        );
        assert_eq!(
            LinkSigner::new(&format!("  {}\n", &SECRET[1..])).unwrap_err(),
            LinkError::SecretTooShort(31)
        );
        // A file's trailing newline is not part of the key.
        let from_file = LinkSigner::new(&format!("{SECRET}\n")).unwrap();
        assert_eq!(from_file.sign(id(), NOW), signer().sign(id(), NOW));
        assert!(!format!("{:?}", signer()).contains(SECRET));
    }

    #[test]
    fn generated_secrets_are_long_enough_and_differ() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_ne!(a, b);
        assert!(a.len() >= MIN_SECRET_BYTES);
        LinkSigner::new(&a).unwrap();
    }

    proptest! {
        /// Changing any one byte of a link's id, expiry or signature makes it refused.
        #[test]
        fn any_changed_byte_is_refused(
            expires in NOW..NOW + 10_000_000,
            which in 0usize..3,
            at in any::<prop::sample::Index>(),
            to in any::<u8>(),
        ) {
            let s = signer();
            let (i, e, g) = parts(&s.path(id(), expires));
            let mut fields = [i.into_bytes(), e.into_bytes(), g.into_bytes()];
            let field = &mut fields[which];
            let at = at.index(field.len());
            prop_assume!(field[at] != to);
            field[at] = to;
            let [i, e, g] = fields.map(|f| String::from_utf8_lossy(&f).into_owned());
            prop_assert_eq!(s.verify(&i, &e, &g, NOW), Err(Refusal::Forged));
        }

        /// Every link the signer makes for a future expiry opens its own job's page.
        #[test]
        fn every_signed_link_verifies(bits in any::<u128>(), ahead in 0i64..100_000_000) {
            let s = signer();
            let id = RequestId(uuid::Uuid::from_u128(bits));
            let (i, e, g) = parts(&s.path(id, NOW + ahead));
            prop_assert_eq!(s.verify(&i, &e, &g, NOW), Ok(id));
        }
    }
}
