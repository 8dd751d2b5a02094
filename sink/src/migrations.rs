//! Versioned schema migrations, embedded in the binary and applied at start
//! (or by `adstream-sink migrate`).
//!
//! Every statement is idempotent (`IF NOT EXISTS`, `if_not_exists => TRUE`),
//! so a migration interrupted half-way is simply applied again. Versions are
//! recorded in `adstream_schema_migrations`. The TimescaleDB migration runs
//! only where the extension is installed; without it the tables stay plain
//! PostgreSQL tables, and the migration is applied later if the extension
//! appears. Parts separated by `-- statement-break` run as separate
//! statements because TimescaleDB refuses to create continuous aggregates
//! inside a transaction block.

use tokio_postgres::Client;

/// A migration: version, name, SQL, and whether it needs TimescaleDB.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
    pub needs_timescaledb: bool,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "tables",
        sql: include_str!("../migrations/001_tables.sql"),
        needs_timescaledb: false,
    },
    Migration {
        version: 2,
        name: "timescaledb",
        sql: include_str!("../migrations/002_timescaledb.sql"),
        needs_timescaledb: true,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i32,
        name: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("reading migration state: {0}")]
    State(#[from] tokio_postgres::Error),
}

/// What [`migrate`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub applied: Vec<i32>,
    pub already: Vec<i32>,
    pub skipped_no_timescaledb: Vec<i32>,
    pub timescaledb: bool,
}

/// Whether the timescaledb extension is installed in the connected database.
pub async fn has_timescaledb(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await?;
    Ok(row.is_some())
}

/// Applies every pending migration.
pub async fn migrate(client: &Client) -> Result<Applied, MigrationError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS adstream_schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let done: Vec<i32> = client
        .query("SELECT version FROM adstream_schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let timescaledb = has_timescaledb(client).await?;
    let mut out = Applied {
        timescaledb,
        ..Default::default()
    };
    for m in MIGRATIONS {
        if done.contains(&m.version) {
            out.already.push(m.version);
            continue;
        }
        if m.needs_timescaledb && !timescaledb {
            out.skipped_no_timescaledb.push(m.version);
            continue;
        }
        let failed = |source| MigrationError::Failed {
            version: m.version,
            name: m.name,
            source,
        };
        for part in m.sql.split("\n-- statement-break\n") {
            client.batch_execute(part).await.map_err(failed)?;
        }
        client
            .execute(
                "INSERT INTO adstream_schema_migrations (version, name) VALUES ($1, $2)
                 ON CONFLICT (version) DO NOTHING",
                &[&m.version, &m.name],
            )
            .await
            .map_err(failed)?;
        out.applied.push(m.version);
    }
    Ok(out)
}
