//! Test fixtures shared by Bulkhead's test suites.
