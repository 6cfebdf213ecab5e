//! Seeding connections that predate the collector from the kernel socket tables.
