//! Who is looking at the console. The login form takes the read or the admin token and
//! checks it with the admin API's own rules (`Access`); the browser then holds only a
//! random session id, in an HttpOnly, SameSite=Strict cookie scoped to `/ui` (never in a
//! URL). Every session has its own form token: a POST without it, from another origin, or
//! without the admin token's session is refused.

use axum::http::HeaderMap;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::access::{Access, Reader};

/// The session cookie's name.
pub const COOKIE: &str = "enrich_console";

/// Sessions kept at most; past that the oldest one of the new session's role is forgotten
/// (of any role only when that role holds none), so logins with the read token can never
/// push the admin's sessions out.
const MAX_SESSIONS: usize = 10_000;

/// What a session may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The admin token: look and act.
    Admin,
    /// The read token: look, payloads included.
    Read,
    /// No token is configured at all (a local demo): look, without payloads.
    Anonymous,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Read => "read only",
            Role::Anonymous => "read only, no token configured",
        }
    }

    pub fn may_act(self) -> bool {
        self == Role::Admin
    }

    pub fn sees_payloads(self) -> bool {
        self != Role::Anonymous
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    pub role: Role,
    /// The form token every POST of this session must carry.
    pub csrf: String,
    pub created: Instant,
    expires: Instant,
}

pub struct Sessions {
    ttl: Duration,
    max: usize,
    map: Mutex<HashMap<String, Session>>,
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The role a token given at the login earns, if any.
pub fn role_of(access: &Access, token: &str) -> Option<Role> {
    if access.is_open() {
        return token.is_empty().then_some(Role::Anonymous);
    }
    let header = format!("Bearer {token}");
    if access.admin(Some(&header)).is_ok() {
        Some(Role::Admin)
    } else if access.read(Some(&header)) == Ok(Reader::Authenticated) {
        Some(Role::Read)
    } else {
        None
    }
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Self::with_limit(ttl, MAX_SESSIONS)
    }

    /// At most `max` sessions at once.
    pub fn with_limit(ttl: Duration, max: usize) -> Self {
        Self { ttl, max: max.max(1), map: Mutex::new(HashMap::new()) }
    }

    /// A new session for `role`: its id (for the cookie) and the session.
    pub fn open(&self, role: Role) -> (String, Session) {
        let now = Instant::now();
        let session = Session { role, csrf: random_hex(), created: now, expires: now + self.ttl };
        let id = random_hex();
        if let Ok(mut map) = self.map.lock() {
            map.retain(|_, s| s.expires > now);
            if map.len() >= self.max {
                let oldest = |same_role: bool| {
                    map.iter()
                        .filter(|(_, s)| !same_role || s.role == role)
                        .min_by_key(|(_, s)| s.created)
                        .map(|(k, _)| k.clone())
                };
                if let Some(oldest) = oldest(true).or_else(|| oldest(false)) {
                    map.remove(&oldest);
                }
            }
            map.insert(id.clone(), session.clone());
        }
        (id, session)
    }

    /// The live session the request's cookie names.
    pub fn get(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let map = self.map.lock().ok()?;
        map.get(id).filter(|s| s.expires > Instant::now()).cloned()
    }

    pub fn close(&self, headers: &HeaderMap) {
        if let (Some(id), Ok(mut map)) = (cookie(headers, COOKIE), self.map.lock()) {
            map.remove(id);
        }
    }

    /// The `Set-Cookie` value that carries a session id.
    pub fn set_cookie(&self, id: &str) -> String {
        format!("{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}", self.ttl.as_secs())
    }

    /// The `Set-Cookie` value that removes it.
    pub fn clear_cookie() -> String {
        format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0")
    }
}

/// The value of one cookie of the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether a POST comes from the console's own pages: its `Origin` (or, lacking one,
/// `Sec-Fetch-Site`) must not name another site.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(axum::http::header::HOST).and_then(|v| v.to_str().ok());
    if let Some(origin) = headers.get(axum::http::header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let Some(host) = host else { return false };
        let bare = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
        return bare == Some(host);
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some(site) => matches!(site, "same-origin" | "none"),
        None => true,
    }
}

/// Whether the form token sent matches the session's.
pub fn csrf_ok(session: &Session, sent: Option<&str>) -> bool {
    sent.is_some_and(|s| constant_time_eq(s.as_bytes(), session.csrf.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn tokens_earn_their_roles_and_sessions_expire() {
        let access = Access::new(Some("admin-token-0123456789"), Some("read-token-0123456789"));
        assert_eq!(role_of(&access, "admin-token-0123456789"), Some(Role::Admin));
        assert_eq!(role_of(&access, "read-token-0123456789"), Some(Role::Read));
        assert_eq!(role_of(&access, "wrong"), None);
        assert_eq!(role_of(&access, ""), None);
        assert_eq!(role_of(&Access::new(None, None), ""), Some(Role::Anonymous));

        let sessions = Sessions::new(Duration::from_secs(60));
        let (id, s) = sessions.open(Role::Read);
        let mut headers = HeaderMap::new();
        headers.insert("cookie", HeaderValue::from_str(&format!("other=1; {COOKIE}={id}")).unwrap());
        assert_eq!(sessions.get(&headers).map(|s| s.role), Some(Role::Read));
        assert!(csrf_ok(&s, Some(&s.csrf)) && !csrf_ok(&s, Some("nope")) && !csrf_ok(&s, None));
        sessions.close(&headers);
        assert!(sessions.get(&headers).is_none(), "logged out");
        let gone = Sessions::new(Duration::ZERO);
        let (id, _) = gone.open(Role::Admin);
        headers.insert("cookie", HeaderValue::from_str(&format!("{COOKIE}={id}")).unwrap());
        assert!(gone.get(&headers).is_none(), "expired");
    }

    #[test]
    fn logins_with_the_read_token_never_push_out_the_admin_s_session() {
        let sessions = Sessions::with_limit(Duration::from_secs(60), 10);
        let (admin, _) = sessions.open(Role::Admin);
        let mut headers = HeaderMap::new();
        headers.insert("cookie", HeaderValue::from_str(&format!("{COOKIE}={admin}")).unwrap());
        for _ in 0..100 {
            sessions.open(Role::Read);
        }
        assert_eq!(
            sessions.get(&headers).map(|s| s.role),
            Some(Role::Admin),
            "100 logins with the read token pushed the admin's session out"
        );
        assert!(sessions.map.lock().unwrap().len() <= 10, "the store stays bounded");
        // Past the limit, an admin login still gets in (pushing out the oldest read session).
        let (again, _) = sessions.open(Role::Admin);
        headers.insert("cookie", HeaderValue::from_str(&format!("{COOKIE}={again}")).unwrap());
        assert_eq!(sessions.get(&headers).map(|s| s.role), Some(Role::Admin));
        assert!(sessions.map.lock().unwrap().len() <= 10);
    }

    #[test]
    fn a_post_from_another_origin_is_told_apart() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("127.0.0.1:9104"));
        assert!(same_origin(&h), "no Origin, no Sec-Fetch-Site: a non-browser client");
        h.insert("origin", HeaderValue::from_static("http://127.0.0.1:9104"));
        assert!(same_origin(&h));
        h.insert("origin", HeaderValue::from_static("http://evil.example"));
        assert!(!same_origin(&h));
        h.remove("origin");
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
    }
}
