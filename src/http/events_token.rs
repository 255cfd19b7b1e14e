//! Short-lived tokens for one job's event stream.
//!
//! A browser's `EventSource` cannot send an `Authorization` header, so with `API_KEYS` set a page
//! first asks `POST /jobs/{id}/events-token` (authenticated with its key, in a header) for a
//! token, then opens `GET /jobs/{id}/events?token=…`. The token is not the key and cannot be
//! turned into it:
//!
//! - it is an HMAC-SHA256 over the job id, the caller's key id (a digest prefix, never the key),
//!   whether the caller is an admin, and an expiry a few minutes ahead;
//! - the HMAC secret is random per process, so a restart invalidates every token;
//! - it is accepted on `GET /jobs/{id}/events` of that one job only, and only until it expires
//!   (a stream opened in time runs to its end; a reconnect after expiry needs a new token).
//!
//! Its shape is `EXPIRY.OWNER.ADMIN.MAC`: the expiry in Unix seconds, the key id (`-` when the
//! API is open), `1` or `0`, and the MAC in unpadded base64url.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::handlers::Caller;

/// How long a token may be used to open (or reopen) a stream.
pub const TTL: Duration = Duration::from_secs(300);

/// Mints and checks event-stream tokens with a secret that lives as long as the process.
pub struct EventTokens {
    /// One SHA-256 block: HMAC uses a key of this size as it is.
    secret: [u8; 64],
}

impl Default for EventTokens {
    fn default() -> Self {
        Self::new()
    }
}

impl EventTokens {
    /// A fresh random secret (the thread RNG is a CSPRNG seeded from the OS).
    pub fn new() -> Self {
        Self {
            secret: rand::random(),
        }
    }

    /// A token for `caller` to follow job `job_id`, and when it expires (Unix seconds).
    pub fn mint(&self, job_id: &str, caller: &Caller, now: SystemTime) -> (String, u64) {
        let expires = unix_secs(now) + TTL.as_secs();
        let owner = caller.key_id.as_deref().unwrap_or("-");
        let admin = if caller.admin { "1" } else { "0" };
        let mac = URL_SAFE_NO_PAD.encode(self.mac(job_id, owner, admin, expires));
        (format!("{expires}.{owner}.{admin}.{mac}"), expires)
    }

    /// The caller a token was minted for, when it is genuine, for this job, and not expired.
    pub fn verify(&self, token: &str, job_id: &str, now: SystemTime) -> Option<Caller> {
        let mut parts = token.split('.');
        let (expires, owner, admin, mac) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !matches!(admin, "0" | "1") {
            return None;
        }
        let expires: u64 = expires.parse().ok()?;
        if expires <= unix_secs(now) {
            return None;
        }
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let mut check = self.keyed();
        feed(&mut check, job_id, owner, admin, expires);
        // `verify_slice` compares in constant time.
        check.verify_slice(&mac).ok()?;
        Some(Caller {
            key_id: (owner != "-").then(|| owner.to_owned()),
            admin: admin == "1",
        })
    }

    fn mac(&self, job_id: &str, owner: &str, admin: &str, expires: u64) -> Vec<u8> {
        let mut mac = self.keyed();
        feed(&mut mac, job_id, owner, admin, expires);
        mac.finalize().into_bytes().to_vec()
    }

    fn keyed(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new(&self.secret.into())
    }
}

/// The signed message: a purpose label and each field on its own line (none holds a newline:
/// job ids are UUIDs, owners hex or `-`), so no two field sets sign the same bytes.
fn feed(mac: &mut Hmac<Sha256>, job_id: &str, owner: &str, admin: &str, expires: u64) {
    mac.update(
        format!(
            "tiny-backspace events-token v1\n{}\n{owner}\n{admin}\n{expires}",
            job_id.to_ascii_lowercase()
        )
        .as_bytes(),
    );
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "6f0c1a2b-0000-4000-8000-000000000001";

    fn caller(key_id: Option<&str>, admin: bool) -> Caller {
        Caller {
            key_id: key_id.map(str::to_owned),
            admin,
        }
    }

    #[test]
    fn a_token_names_its_caller_for_its_job_until_it_expires() {
        let tokens = EventTokens::new();
        let now = SystemTime::now();
        let owner = caller(Some("0123456789abcdef"), false);
        let (token, expires) = tokens.mint(JOB, &owner, now);
        assert_eq!(expires, unix_secs(now) + 300);
        assert_eq!(tokens.verify(&token, JOB, now), Some(owner.clone()));
        // Job ids are case-insensitive, like the routes'.
        assert_eq!(
            tokens.verify(&token, &JOB.to_ascii_uppercase(), now),
            Some(owner)
        );
        assert_eq!(
            tokens.verify(&token, JOB, now + TTL - Duration::from_secs(1)),
            tokens.verify(&token, JOB, now)
        );
        assert_eq!(tokens.verify(&token, JOB, now + TTL), None);
        let other_job = "6f0c1a2b-0000-4000-8000-000000000002";
        assert_eq!(tokens.verify(&token, other_job, now), None);
    }

    #[test]
    fn admin_and_open_callers_round_trip() {
        let tokens = EventTokens::new();
        let now = SystemTime::now();
        for who in [caller(Some("fedcba9876543210"), true), caller(None, true)] {
            let (token, _) = tokens.mint(JOB, &who, now);
            assert_eq!(tokens.verify(&token, JOB, now), Some(who));
        }
    }

    #[test]
    fn altered_foreign_or_malformed_tokens_are_refused() {
        let tokens = EventTokens::new();
        let now = SystemTime::now();
        let (token, _) = tokens.mint(JOB, &caller(Some("0123456789abcdef"), false), now);
        let parts: Vec<&str> = token.split('.').collect();
        let altered = [
            // Another owner, admin rights, a later expiry: each breaks the MAC.
            format!(
                "{}.{}.{}.{}",
                parts[0], "fedcba9876543210", parts[2], parts[3]
            ),
            format!("{}.{}.{}.{}", parts[0], parts[1], "1", parts[3]),
            format!(
                "{}.{}.{}.{}",
                parts[0].parse::<u64>().unwrap() + 3600,
                parts[1],
                parts[2],
                parts[3]
            ),
            format!("{token}.x"),
            String::new(),
            "1.2.3".into(),
            format!("{}.{}.2.{}", parts[0], parts[1], parts[3]),
            format!("{}.{}.{}.not*base64", parts[0], parts[1], parts[2]),
        ];
        for bad in &altered {
            assert_eq!(tokens.verify(bad, JOB, now), None, "{bad}");
        }
        // Another process (another secret) does not accept it either.
        assert_eq!(EventTokens::new().verify(&token, JOB, now), None);
    }
}
