//! PostgreSQL: the pool, TLS to the server, and the embedded migrations (`migrations/`).

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, PgPool};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::config::DatabaseSettings;

pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Connects (without logging every statement) and, when configured, migrates. The
/// sessions carry `application` as their `application_name`, so an operator (or a
/// test) can tell a stage's sessions apart in `pg_stat_activity`.
///
/// TLS follows the URL's `sslmode` (libpq's meanings; `prefer` when absent) and
/// `sslrootcert`. A connection that cannot be made stops the caller at start with the
/// reason: which mode, which CA file, what failed in the handshake; never the password.
pub async fn connect(settings: &DatabaseSettings, application: &str) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(settings.url.expose())
        .map_err(|e| anyhow::anyhow!("database.url is not a valid PostgreSQL URL: {e}"))?
        .application_name(application)
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    let tls = Tls::of(settings.url.expose(), &options);
    tls.check()?;
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| tls.connect_error(&e))?;
    if settings.migrate_on_start {
        migrate(&pool).await?;
    }
    Ok(pool)
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.map_err(|e| anyhow::anyhow!("database migration failed: {e}"))
}

/// Whether a failed database call is worth trying again as it is: the database
/// unreachable, restarting, out of resources, or a conflict between transactions — not
/// a statement it refuses (bad input, a constraint), which fails the same way again.
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<sqlx::Error>().is_some_and(sqlx_transient) || c.downcast_ref::<Transient>().is_some())
}

fn sqlx_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions, transaction rollbacks (serialization, deadlock),
        // insufficient resources, operator intervention (shutdown, restart), system
        // errors, and a lock not available.
        sqlx::Error::Database(d) => {
            d.code().is_some_and(|c| ["08", "40", "53", "57", "58"].iter().any(|p| c.starts_with(p)) || c == "55P03")
        }
        _ => false,
    }
}

/// A failure `is_transient` counts as transient, carried as text (a batch writer's,
/// whose one statement answered many callers).
#[derive(Debug)]
pub struct Transient(pub String);

impl std::fmt::Display for Transient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Transient {}

/// What `database.url` asks of TLS, for checks at start and for error messages. Holds
/// no credentials.
struct Tls {
    mode: PgSslMode,
    /// `sslrootcert` from the URL, or `PGSSLROOTCERT` (which sqlx also reads).
    root_cert: Option<PathBuf>,
    server: String,
}

impl Tls {
    fn of(url: &str, options: &PgConnectOptions) -> Self {
        let from_url = url::Url::parse(url).ok().and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| matches!(k.as_ref(), "sslrootcert" | "ssl-root-cert" | "ssl-ca"))
                .map(|(_, v)| PathBuf::from(v.as_ref()))
        });
        let root_cert = from_url.or_else(|| std::env::var_os("PGSSLROOTCERT").map(PathBuf::from));
        let server = match options.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", options.get_host(), options.get_port()),
        };
        Self { mode: options.get_ssl_mode(), root_cert, server }
    }

    fn verifies(&self) -> bool {
        matches!(self.mode, PgSslMode::VerifyCa | PgSslMode::VerifyFull)
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::VerifyFull => "verify-full",
        }
    }

    /// A CA file that cannot be read is a configuration error, said before connecting
    /// (sqlx would report only the I/O error, without the file).
    fn check(&self) -> anyhow::Result<()> {
        if let (true, Some(path)) = (self.verifies(), &self.root_cert) {
            std::fs::metadata(path)
                .and_then(|m| if m.is_file() { Ok(()) } else { Err(std::io::Error::other("not a file")) })
                .map_err(|e| {
                    anyhow::anyhow!(
                        "database.url: sslrootcert {} cannot be read (sslmode={}): {e}",
                        path.display(),
                        self.mode_name()
                    )
                })?;
        }
        if !self.verifies() && !self.is_local() {
            tracing::warn!(
                sslmode = self.mode_name(),
                server = %self.server,
                "database.url does not verify the server's certificate: use sslmode=verify-full with sslrootcert"
            );
        }
        Ok(())
    }

    fn is_local(&self) -> bool {
        let host = self.server.rsplit_once(':').map_or(self.server.as_str(), |(h, _)| h);
        self.server.starts_with('/')
            || host == "localhost"
            || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    fn trust(&self) -> String {
        match &self.root_cert {
            Some(path) => format!("the CA in sslrootcert {}", path.display()),
            None => "the system's trusted CAs (no sslrootcert)".into(),
        }
    }

    fn connect_error(&self, e: &sqlx::Error) -> anyhow::Error {
        let at =
            format!("cannot connect to PostgreSQL at {} (database.url, sslmode={})", self.server, self.mode_name());
        if let Some(tls) = rustls_error(e) {
            return match tls {
                rustls::Error::InvalidCertificate(why) => anyhow::anyhow!(
                    "{at}: TLS: the server's certificate was not verified against {}: {why:?}",
                    self.trust()
                ),
                other => anyhow::anyhow!("{at}: the TLS handshake failed: {other}"),
            };
        }
        match e {
            sqlx::Error::Tls(why) => anyhow::anyhow!("{at}: TLS: {why}"),
            other => anyhow::anyhow!("{at}: {other}"),
        }
    }
}

/// The rustls error inside a failed connection, when the handshake is what failed.
fn rustls_error(e: &sqlx::Error) -> Option<&rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = match e {
        sqlx::Error::Io(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
        sqlx::Error::Tls(inner) => Some(inner.as_ref() as &(dyn std::error::Error + 'static)),
        _ => None,
    };
    while let Some(err) = source {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        source = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_database_is_transient_a_refused_statement_is_not() {
        let io = sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(is_transient(&anyhow::Error::from(io).context("settle the budget")));
        assert!(is_transient(&anyhow::Error::from(sqlx::Error::PoolTimedOut)));
        assert!(is_transient(&anyhow::Error::new(Transient("batch failed".into()))));
        assert!(!is_transient(&anyhow::Error::from(sqlx::Error::RowNotFound)));
        assert!(!is_transient(&anyhow::anyhow!("invalid byte sequence for encoding \"UTF8\": 0x00")));
    }

    fn tls(url: &str) -> Tls {
        Tls::of(url, &PgConnectOptions::from_str(url).unwrap())
    }

    #[test]
    fn the_mode_and_the_ca_file_come_from_the_url() {
        let t = tls("postgres://u:secret@db.example:6432/d?sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem");
        assert_eq!(t.mode_name(), "verify-full");
        assert_eq!(t.root_cert, Some(PathBuf::from("/etc/ca x.pem")));
        assert_eq!(t.server, "db.example:6432");
        assert!(!t.is_local());
        assert!(tls("postgres://u@127.0.0.1/d").is_local());
    }

    #[test]
    fn an_unreadable_ca_file_is_named_before_connecting() {
        let err = tls("postgres://u:secret@db.example/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .check()
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.url") && err.contains("/nonexistent/ca.pem"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn a_failed_verification_names_the_mode_and_the_ca_file_and_not_the_password() {
        let t = tls("postgres://u:secret@db.example/d?sslmode=verify-full&sslrootcert=/etc/ca.pem");
        let handshake = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let e = sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, handshake));
        let msg = t.connect_error(&e).to_string();
        assert!(msg.contains("database.url, sslmode=verify-full"), "{msg}");
        assert!(msg.contains("not verified against the CA in sslrootcert /etc/ca.pem: UnknownIssuer"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
    }
}
