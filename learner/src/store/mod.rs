//! The service-graph store (sqlx: SQLite or Postgres). All SQL lives here.
