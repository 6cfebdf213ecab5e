//! eventually fixtures.
