//! postgres fixtures.
