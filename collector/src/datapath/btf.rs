//! Kernel struct offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Rust eBPF has no CO-RE relocations, so the programs cannot be compiled against
//! one kernel's `struct sock` layout and run on another. Instead user space looks
//! the fields up here, by name, at load time and passes the byte offsets to the
//! programs as a read-only global ([`KernelOffsets`]). Every lookup checks the
//! field's size too, so a kernel that changed a field's type fails loudly instead
//! of feeding the programs garbage.

use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};
use bulkhead_abi::collector::{
    KernelOffsets, OFFSETS_HAVE_NETNS, OFFSETS_HAVE_SOCK_CGROUP, OFFSETS_HAVE_TCP_BYTES, OFFSETS_HAVE_TCP_SEGS,
};

/// Why a kernel field could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("could not read kernel BTF from {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct {name}")]
    NoStruct { name: String },
    #[error("kernel BTF: struct {parent} has no member {member} (looking up {path})")]
    NoMember { parent: String, member: String, path: String },
    #[error("kernel BTF: {path} is a bitfield or not byte aligned")]
    NotByteAligned { path: String },
    #[error("kernel BTF: {path} is {size} bytes, expected {expected}")]
    UnexpectedSize { path: String, size: usize, expected: usize },
    #[error("kernel BTF: {path} goes through a non-struct member {member}")]
    NotAStruct { path: String, member: String },
    #[error("kernel BTF: {path} does not fit the 32-bit offsets the programs use")]
    OffsetTooLarge { path: String },
    #[error("kernel BTF lookup failed for {path}: {source}")]
    Lookup {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
}

/// Reads `path` and resolves every offset the collector's programs use.
///
/// The netns offsets are mandatory (without them the kernel-side filter cannot
/// work); byte counters, segment counters and the socket's cgroup are optional and
/// flagged in [`KernelOffsets::flags`] — a missing one is logged and the field is
/// reported as 0.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, BtfError> {
    let btf = Btf::from_file(path).map_err(|source| BtfError::Read { path: path.to_owned(), source })?;
    resolve(&btf)
}

pub(crate) fn resolve(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let mut off = KernelOffsets {
        sk_net: field(btf, "sock", &["__sk_common", "skc_net", "net"], 8)?,
        net_ns_inum: field(btf, "net", &["ns", "inum"], 4)?,
        flags: OFFSETS_HAVE_NETNS,
        ..KernelOffsets::ZERO
    };
    match (field(btf, "tcp_sock", &["bytes_acked"], 8), field(btf, "tcp_sock", &["bytes_received"], 8)) {
        (Ok(acked), Ok(received)) => {
            off.tcp_bytes_acked = acked;
            off.tcp_bytes_received = received;
            off.flags |= OFFSETS_HAVE_TCP_BYTES;
        }
        (Err(err), _) | (_, Err(err)) => {
            tracing::warn!(error = %err, "TCP byte counters unavailable; Close events will carry 0 bytes.");
        }
    }
    match (field(btf, "tcp_sock", &["segs_in"], 4), field(btf, "tcp_sock", &["segs_out"], 4)) {
        (Ok(segs_in), Ok(segs_out)) => {
            off.tcp_segs_in = segs_in;
            off.tcp_segs_out = segs_out;
            off.flags |= OFFSETS_HAVE_TCP_SEGS;
        }
        (Err(err), _) | (_, Err(err)) => {
            tracing::warn!(error = %err, "TCP segment counters unavailable; Close events will carry 0 packets.");
        }
    }
    match (
        field(btf, "sock", &["sk_cgrp_data", "cgroup"], 8),
        field(btf, "cgroup", &["kn"], 8),
        field(btf, "kernfs_node", &["id"], 8),
    ) {
        (Ok(sk_cgroup), Ok(cgroup_kn), Ok(kn_id)) => {
            off.sk_cgroup = sk_cgroup;
            off.cgroup_kn = cgroup_kn;
            off.kn_id = kn_id;
            off.flags |= OFFSETS_HAVE_SOCK_CGROUP;
        }
        (Err(err), _, _) | (_, Err(err), _) | (_, _, Err(err)) => {
            tracing::warn!(error = %err, "Socket cgroup unavailable; accepted connections will carry cgroup 0.");
        }
    }
    Ok(off)
}

/// Byte offset of `root.path[0].path[1]…` (members of embedded structs, not
/// pointers), checking that the last member is `expected_size` bytes.
///
/// Anonymous struct/union members are searched transparently, the way C lets
/// `sk->skc_net` reach into `sk->__sk_common`'s unnamed unions.
pub(crate) fn field(btf: &Btf, root: &str, path: &[&str], expected_size: usize) -> Result<u32, BtfError> {
    let dotted = format!("{root}.{}", path.join("."));
    let lookup = |source| BtfError::Lookup { path: dotted.clone(), source };
    let mut current = find_struct(btf, root)?;
    let mut current_name = root.to_owned();
    let mut bits: u64 = 0;
    let mut last_type: Option<Type> = None;
    for (i, member_name) in path.iter().enumerate() {
        if i > 0 {
            let Some(Type::Struct(s) | Type::Union(s)) = last_type.take() else {
                return Err(BtfError::NotAStruct { path: dotted, member: path[i - 1].to_owned() });
            };
            current = s;
            current_name = path[i - 1].to_owned();
        }
        let Some((member_bits, ty)) = find_member(btf, &current, member_name).map_err(lookup)? else {
            return Err(BtfError::NoMember { parent: current_name, member: (*member_name).to_owned(), path: dotted });
        };
        bits += member_bits;
        last_type = Some(ty);
    }
    if !bits.is_multiple_of(8) {
        return Err(BtfError::NotByteAligned { path: dotted });
    }
    let size = last_type.as_ref().map(|t| type_size(btf, t)).transpose().map_err(lookup)?.unwrap_or(0);
    if size != expected_size {
        return Err(BtfError::UnexpectedSize { path: dotted, size, expected: expected_size });
    }
    u32::try_from(bits / 8).map_err(|_| BtfError::OffsetTooLarge { path: dotted })
}

fn find_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct, BtfError> {
    let types = btf.resolve_types_by_name(name).map_err(|_| BtfError::NoStruct { name: name.to_owned() })?;
    types
        .into_iter()
        .find_map(|t| match t {
            // Forward declarations and zero-sized duplicates are skipped.
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| BtfError::NoStruct { name: name.to_owned() })
}

/// Finds `name` among `s`'s members, descending into anonymous members. Returns
/// the bit offset from the start of `s` and the member's type with typedefs and
/// qualifiers stripped.
fn find_member(btf: &Btf, s: &btf_rs::Struct, name: &str) -> Result<Option<(u64, Type)>, btf_rs::Error> {
    for member in &s.members {
        if member.bitfield_size().is_some_and(|b| b != 0) {
            // A bitfield can't be what we look for (we need whole fields) but may
            // share a name: only skip it if it is not the one asked for.
            if btf.resolve_name(member)? == name {
                return Ok(None);
            }
            continue;
        }
        let member_name = btf.resolve_name(member)?;
        let ty = strip(btf, btf.resolve_chained_type(member)?)?;
        if member_name == name {
            return Ok(Some((u64::from(member.bit_offset()), ty)));
        }
        if member_name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = &ty
            && let Some((bits, found)) = find_member(btf, inner, name)?
        {
            return Ok(Some((u64::from(member.bit_offset()) + bits, found)));
        }
    }
    Ok(None)
}

/// Strips typedefs and qualifiers.
fn strip(btf: &Btf, mut ty: Type) -> Result<Type, btf_rs::Error> {
    // Bounded: BTF chains are short; a loop would mean corrupt BTF.
    for _ in 0..32 {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t)?,
            Type::Volatile(t) | Type::Const(t) | Type::Restrict(t) => btf.resolve_chained_type(t)?,
            Type::TypeTag(t) => btf.resolve_chained_type(t)?,
            _ => return Ok(ty),
        };
    }
    Ok(ty)
}

fn type_size(btf: &Btf, ty: &Type) -> Result<usize, btf_rs::Error> {
    Ok(match strip(btf, ty.clone())? {
        Type::Int(i) => i.size(),
        Type::Ptr(_) => 8,
        Type::Struct(s) | Type::Union(s) => s.size(),
        Type::Enum(e) => e.size(),
        Type::Enum64(e) => e.size(),
        Type::Array(a) => {
            let elem = strip(btf, btf.resolve_chained_type(&a)?)?;
            type_size(btf, &elem)? * a.len()
        }
        _ => 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against the machine's own BTF: that is the input that matters, and
    /// every kernel we support ships it.
    fn vmlinux() -> Option<Btf> {
        Btf::from_file("/sys/kernel/btf/vmlinux").ok()
    }

    #[test]
    fn resolves_every_offset_on_this_kernel() {
        let Some(btf) = vmlinux() else {
            panic!("/sys/kernel/btf/vmlinux is missing: the collector cannot run on this kernel");
        };
        let off = resolve(&btf).expect("offsets");
        assert_ne!(off.sk_net, 0, "skc_net is not the first field of sock_common");
        assert_eq!(
            off.flags,
            OFFSETS_HAVE_NETNS | OFFSETS_HAVE_TCP_BYTES | OFFSETS_HAVE_TCP_SEGS | OFFSETS_HAVE_SOCK_CGROUP
        );
        // tcp_sock embeds inet_connection_sock which embeds sock: counters come after.
        let sock_size = find_struct(&btf, "sock").expect("sock").size() as u32;
        assert!(off.tcp_bytes_acked >= sock_size);
        assert!(off.tcp_bytes_received >= sock_size);
    }

    #[test]
    fn missing_member_and_wrong_size_are_errors() {
        let Some(btf) = vmlinux() else {
            panic!("/sys/kernel/btf/vmlinux is missing");
        };
        assert!(matches!(field(&btf, "sock", &["no_such_member"], 8), Err(BtfError::NoMember { .. })));
        assert!(matches!(field(&btf, "net", &["ns", "inum"], 8), Err(BtfError::UnexpectedSize { .. })));
        assert!(matches!(field(&btf, "no_such_struct_xyz", &["a"], 8), Err(BtfError::NoStruct { .. })));
    }
}
