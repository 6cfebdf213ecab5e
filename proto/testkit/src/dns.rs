//! A tiny DNS responder and client for tests that need real DNS answers on the wire
//! (the collector captures them). Both work on sockets the caller bound, so the caller
//! decides which network namespace they live in.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::thread::JoinHandle;
use std::time::Duration;

use simple_dns::rdata::{A, AAAA, RData};
use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, ResourceRecord, TYPE};

/// What the responder answers: every A query with `v4` (TTL `ttl_a`), every AAAA
/// query with `v6` (TTL `ttl_aaaa`).
#[derive(Debug, Clone, Copy)]
pub struct Answers {
    pub v4: Ipv4Addr,
    pub ttl_a: u32,
    pub v6: Ipv6Addr,
    pub ttl_aaaa: u32,
}

/// Answers `queries` queries on `sock`, then returns. Panics (in the thread) on a
/// malformed query or after 5 s without one.
pub fn responder(sock: UdpSocket, queries: usize, answers: Answers) -> JoinHandle<()> {
    sock.set_read_timeout(Some(Duration::from_secs(5))).expect("responder timeout");
    std::thread::spawn(move || {
        for _ in 0..queries {
            let mut buf = [0u8; 512];
            let (n, from) = sock.recv_from(&mut buf).expect("a DNS query within 5 s");
            let query = Packet::parse(&buf[..n]).expect("parse query");
            let mut reply = query.clone().into_reply();
            for q in &query.questions {
                let (ttl, rdata) = match q.qtype {
                    QTYPE::TYPE(TYPE::AAAA) => (answers.ttl_aaaa, RData::AAAA(AAAA { address: answers.v6.into() })),
                    _ => (answers.ttl_a, RData::A(A { address: answers.v4.into() })),
                };
                reply.answers.push(ResourceRecord::new(q.qname.clone(), CLASS::IN, ttl, rdata));
            }
            sock.send_to(&reply.build_bytes_vec_compressed().expect("build reply"), from).expect("send reply");
        }
    })
}

/// Sends one query for `name` from `sock` to `server` and returns the number of
/// answers in the reply.
pub fn query(sock: &UdpSocket, server: SocketAddr, name: &str, qtype: TYPE) -> usize {
    let mut q = Packet::new_query(0x4242);
    q.questions.push(Question::new(Name::new_unchecked(name), QTYPE::TYPE(qtype), QCLASS::CLASS(CLASS::IN), false));
    sock.set_read_timeout(Some(Duration::from_secs(5))).expect("query timeout");
    sock.send_to(&q.build_bytes_vec().expect("build query"), server).expect("send query");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a DNS answer within 5 s");
    Packet::parse(&buf[..n]).expect("parse answer").answers.len()
}

pub use simple_dns::TYPE as QueryType;
