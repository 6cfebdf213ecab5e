//! Endpoint facts: network namespaces, their addresses and cgroups.
