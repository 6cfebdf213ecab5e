//! DNS answers from the payloads the kernel copies (UDP from port 53, at most
//! `DNS_PAYLOAD_MAX` bytes). The learner turns these into FQDN groups, so what
//! matters is *which name the workload asked for* and which addresses it got:
//! CNAME chains are followed so `www.example.com → CNAME cdn.example.net → A x`
//! yields both names → x.
//!
//! Input is whatever arrived on the wire, possibly truncated by the copy limit or
//! hostile: every path returns an empty list rather than panicking (property-tested
//! below).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_model::DnsAnswer;
use simple_dns::rdata::RData;
use simple_dns::{Packet, PacketFlag, RCODE};

/// Upper bound on CNAME hops followed per answer (loops in hostile input).
const MAX_CNAME_HOPS: usize = 8;

/// Parses one DNS message and returns its name → address answers.
pub fn parse_answers(payload: &[u8], netns_ino: u64, seen_unix_ms: i64) -> Vec<DnsAnswer> {
    let Ok(packet) = Packet::parse(payload) else {
        return Vec::new();
    };
    if !packet.has_flags(PacketFlag::RESPONSE) || packet.rcode() != RCODE::NoError {
        return Vec::new();
    }
    // alias → (target, ttl)
    let mut cnames: HashMap<String, (String, u32)> = HashMap::new();
    let mut addrs: Vec<(String, IpAddr, u32)> = Vec::new();
    for rr in &packet.answers {
        let name = normalize(&rr.name.to_string());
        match &rr.rdata {
            RData::A(a) => addrs.push((name, IpAddr::V4(Ipv4Addr::from(a.address)), rr.ttl)),
            RData::AAAA(a) => addrs.push((name, IpAddr::V6(Ipv6Addr::from(a.address)), rr.ttl)),
            RData::CNAME(target) => {
                cnames.insert(name, (normalize(&target.0.to_string()), rr.ttl));
            }
            _ => {}
        }
    }

    let mut out = Vec::new();
    for (owner, addr, ttl) in &addrs {
        out.push(DnsAnswer { netns_ino, name: owner.clone(), addr: *addr, ttl_seconds: *ttl, seen_unix_ms });
        // Every alias whose chain ends at `owner` resolved to `addr` too; the
        // effective TTL is the smallest along the chain.
        for (alias, _) in cnames.iter() {
            if let Some(chain_ttl) = chain_ttl(&cnames, alias, owner)
                && !alias.is_empty()
            {
                out.push(DnsAnswer {
                    netns_ino,
                    name: alias.clone(),
                    addr: *addr,
                    ttl_seconds: chain_ttl.min(*ttl),
                    seen_unix_ms,
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.name, a.addr).cmp(&(&b.name, b.addr)));
    out.dedup_by(|a, b| a.name == b.name && a.addr == b.addr);
    out
}

/// Follows `alias`'s CNAME chain; returns the smallest TTL on it if it reaches
/// `owner` within [`MAX_CNAME_HOPS`].
fn chain_ttl(cnames: &HashMap<String, (String, u32)>, alias: &str, owner: &str) -> Option<u32> {
    let mut current = alias;
    let mut ttl = u32::MAX;
    for _ in 0..MAX_CNAME_HOPS {
        let (target, hop_ttl) = cnames.get(current)?;
        ttl = ttl.min(*hop_ttl);
        if target == owner {
            return Some(ttl);
        }
        current = target;
    }
    None
}

/// Lower case, no trailing dot: names compare the way DNS compares them.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use simple_dns::rdata::{A, AAAA, CNAME};
    use simple_dns::{CLASS, Name, QCLASS, QTYPE, Question, ResourceRecord, TYPE};

    use super::*;

    fn reply(records: Vec<ResourceRecord<'static>>) -> Vec<u8> {
        let mut p = Packet::new_reply(7);
        p.questions.push(Question::new(
            Name::new_unchecked("WWW.Example.com"),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.answers = records;
        p.build_bytes_vec_compressed().expect("build")
    }

    fn a(name: &'static str, ttl: u32, addr: Ipv4Addr) -> ResourceRecord<'static> {
        ResourceRecord::new(Name::new_unchecked(name), CLASS::IN, ttl, RData::A(A { address: addr.into() }))
    }

    #[test]
    fn a_and_aaaa_answers() {
        let v6: Ipv6Addr = "2001:db8::5".parse().expect("v6");
        let bytes = reply(vec![
            a("WWW.Example.com", 300, Ipv4Addr::new(192, 0, 2, 5)),
            ResourceRecord::new(
                Name::new_unchecked("www.example.com"),
                CLASS::IN,
                60,
                RData::AAAA(AAAA { address: v6.into() }),
            ),
        ]);
        let got = parse_answers(&bytes, 42, 1000);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "www.example.com");
        assert_eq!(got[0].addr, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 5)));
        assert_eq!(got[0].ttl_seconds, 300);
        assert_eq!(got[0].netns_ino, 42);
        assert_eq!(got[1].addr, IpAddr::V6(v6));
        assert_eq!(got[1].ttl_seconds, 60);
    }

    #[test]
    fn cname_chain_names_the_alias_too() {
        let bytes = reply(vec![
            ResourceRecord::new(
                Name::new_unchecked("www.example.com"),
                CLASS::IN,
                30,
                RData::CNAME(CNAME(Name::new_unchecked("cdn.example.net"))),
            ),
            a("cdn.example.net", 120, Ipv4Addr::new(198, 51, 100, 1)),
        ]);
        let got = parse_answers(&bytes, 1, 0);
        let names: Vec<(&str, u32)> = got.iter().map(|d| (d.name.as_str(), d.ttl_seconds)).collect();
        assert_eq!(names, vec![("cdn.example.net", 120), ("www.example.com", 30)]);
    }

    #[test]
    fn cname_loop_terminates() {
        let bytes = reply(vec![
            ResourceRecord::new(
                Name::new_unchecked("a.test"),
                CLASS::IN,
                30,
                RData::CNAME(CNAME(Name::new_unchecked("b.test"))),
            ),
            ResourceRecord::new(
                Name::new_unchecked("b.test"),
                CLASS::IN,
                30,
                RData::CNAME(CNAME(Name::new_unchecked("a.test"))),
            ),
            a("c.test", 1, Ipv4Addr::new(192, 0, 2, 1)),
        ]);
        let got = parse_answers(&bytes, 1, 0);
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn queries_and_errors_yield_nothing() {
        let mut q = Packet::new_query(1);
        q.questions.push(Question::new(
            Name::new_unchecked("x.test"),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        assert!(parse_answers(&q.build_bytes_vec().expect("build"), 1, 0).is_empty());

        let mut nx = Packet::new_reply(1);
        *nx.rcode_mut() = RCODE::NameError;
        assert!(parse_answers(&nx.build_bytes_vec().expect("build"), 1, 0).is_empty());
    }

    #[test]
    fn truncated_payload_is_not_a_panic() {
        let bytes = reply(vec![a("www.example.com", 300, Ipv4Addr::new(192, 0, 2, 5))]);
        for n in 0..bytes.len() {
            let _ = parse_answers(&bytes[..n], 1, 0);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_answers(&bytes, 1, 0);
        }

        #[test]
        fn mutated_replies_never_panic(flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8)) {
            let mut bytes = reply(vec![
                ResourceRecord::new(
                    Name::new_unchecked("www.example.com"),
                    CLASS::IN,
                    30,
                    RData::CNAME(CNAME(Name::new_unchecked("cdn.example.net"))),
                ),
                a("cdn.example.net", 120, Ipv4Addr::new(198, 51, 100, 1)),
            ]);
            for (i, v) in flips {
                let n = bytes.len();
                bytes[i % n] = v;
            }
            let _ = parse_answers(&bytes, 1, 0);
        }
    }
}
