//! The flag log: SQLite and PostgreSQL backends, and the flags as the CLI and admin API show
//! them.

mod backends;
mod flags;
