//! Types shared by kernel and user space. Everything is `repr(C)` with explicit
//! padding so both sides agree byte for byte.
//!
//! The collector's and the enforcer's datapaths are described here as a contract: the map names the
//! programs declare, the records they write into ring buffers, the keys and values
//! of their aggregation maps and the kernel offsets user space resolves from BTF
//! and hands to the programs at load time (Rust eBPF has no CO-RE, so the
//! programs must never hard-code kernel struct layouts).
//!
//! Rules for everything in this crate: no `bool`, no enums in records (plain
//! integers with named constants whose values are never reused), explicit `_pad`
//! fields, a `const` size assertion per type, fields in network byte order end in
//! `_be`.
#![cfg_attr(target_arch = "bpf", no_std)]

pub mod collector;
pub mod enforcer;

/// Generates `aya::Pod` impls for user space. Kept in one place so the list of
/// plain-old-data types is easy to audit: every type listed here must be
/// `repr(C)`, `Copy` and free of implicit padding.
#[cfg(feature = "user")]
macro_rules! impl_pod {
    ($($ty:ty),* $(,)?) => {
        $(
            // SAFETY: repr(C), Copy, every bit pattern valid, no implicit padding
            // (checked by the size assertions next to each type).
            unsafe impl aya::Pod for $ty {}
        )*
    };
}

#[cfg(feature = "user")]
impl_pod!(
    collector::SockEventRaw,
    collector::DnsEventRaw,
    collector::UdpFlowKey,
    collector::UdpFlowValue,
    collector::SockOwner,
    collector::KernelOffsets,
    collector::CollectorConfig,
    enforcer::IpcacheKey,
    enforcer::IpcacheValue,
    enforcer::PolicyKey,
    enforcer::PolicyValue,
    enforcer::EndpointKey,
    enforcer::EndpointValue,
    enforcer::CtKey,
    enforcer::CtValue,
    enforcer::VerdictEvent,
    enforcer::HttpVerdictEvent,
    enforcer::EnforcerConfig,
    enforcer::RateState,
    enforcer::RuleStats,
    enforcer::DecisionKey,
    enforcer::DecisionValue,
);
