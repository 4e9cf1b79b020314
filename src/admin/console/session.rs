//! Console sessions, kept in memory: a random id (the cookie) maps to a random CSRF token.
//! Bounded (the oldest session goes first) and short-lived; all end when the admin token
//! changes, and a restart logs everyone out, which an admin page can afford.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::RngExt;
use tokio::time::Instant;

/// Most sessions at once; a new login past it ends the oldest.
const MAX_SESSIONS: usize = 256;
/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 60 * 60);

#[derive(Debug)]
struct Session {
    csrf: String,
    started: Instant,
    /// Order of opening (instants can tie).
    seq: u64,
}

/// The open sessions.
#[derive(Debug)]
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
    opened: AtomicU64,
    /// The CSRF token of loopback viewers when no admin token is configured.
    anonymous_csrf: String,
}

impl Default for Sessions {
    fn default() -> Sessions {
        Sessions {
            open: Mutex::new(HashMap::new()),
            opened: AtomicU64::new(0),
            anonymous_csrf: random_id(),
        }
    }
}

impl Sessions {
    /// Opens a session; returns its id (the cookie's value).
    pub fn begin(&self) -> String {
        let id = random_id();
        if let Ok(mut open) = self.open.lock() {
            open.retain(|_, s| s.started.elapsed() < SESSION_TTL);
            if open.len() >= MAX_SESSIONS
                && let Some(oldest) = open
                    .iter()
                    .min_by_key(|(_, s)| s.seq)
                    .map(|(k, _)| k.clone())
            {
                open.remove(&oldest);
            }
            open.insert(
                id.clone(),
                Session {
                    csrf: random_id(),
                    started: Instant::now(),
                    seq: self.opened.fetch_add(1, Ordering::Relaxed),
                },
            );
        }
        id
    }

    /// The CSRF token of the live session `id`.
    pub fn lookup(&self, id: &str) -> Option<String> {
        let open = self.open.lock().ok()?;
        open.get(id)
            .filter(|s| s.started.elapsed() < SESSION_TTL)
            .map(|s| s.csrf.clone())
    }

    /// Ends the session whose CSRF token is `csrf` (logout).
    pub fn end(&self, csrf: &str) {
        if let Ok(mut open) = self.open.lock() {
            open.retain(|_, s| s.csrf != csrf);
        }
    }

    /// Ends every session (the admin token changed).
    pub fn clear(&self) {
        if let Ok(mut open) = self.open.lock() {
            open.clear();
        }
    }

    /// The CSRF token for loopback viewers when no admin token is set.
    pub fn anonymous_csrf(&self) -> &str {
        &self.anonymous_csrf
    }
}

/// 128 random bits from the thread's CSPRNG, as hex.
fn random_id() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_open_end_and_clear() {
        let sessions = Sessions::default();
        let a = sessions.begin();
        let b = sessions.begin();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        let csrf = sessions.lookup(&a).unwrap();
        assert_ne!(csrf, a);
        assert!(sessions.lookup("forged").is_none());
        sessions.end(&csrf);
        assert!(sessions.lookup(&a).is_none());
        assert!(sessions.lookup(&b).is_some());
        sessions.clear();
        assert!(sessions.lookup(&b).is_none());
    }

    #[test]
    fn sessions_are_bounded() {
        let sessions = Sessions::default();
        let first = sessions.begin();
        for _ in 0..MAX_SESSIONS {
            sessions.begin();
        }
        assert!(sessions.lookup(&first).is_none());
        assert_eq!(sessions.open.lock().unwrap().len(), MAX_SESSIONS);
    }
}
