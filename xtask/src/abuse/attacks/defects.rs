//! The issue's defects, each sent as the issue describes it (sizes bounded for a shared
//! machine; the table says what was sent).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{Arena, Attack, Tally};
use crate::abuse::agent::{ATTACKER_KEY, MAX_CONCURRENT};
use crate::abuse::net::{self, ATTACKER, VICTIM};
use crate::abuse::payloads::{self, DEEP};

pub const IDLE_AGENT_CONNECTIONS: &str = "idle-agent-connections";

pub fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            slug: "nested-json",
            issue: "#1",
            sent: "25,000-level JSON in json_schema, response_format (json_object and json_schema), tools[].function.parameters, chat_template_kwargs, top level; a grammar nested 25,000 deep",
            quick: true,
            run: nested_json,
        },
        Attack {
            slug: "nested-json-repeated",
            issue: "#1",
            sent: "25,000-level json_schema every 2 s for 20 s, not waiting for the engine",
            quick: false,
            run: nested_json_repeated,
        },
        Attack {
            slug: "slow-readers",
            issue: "#2",
            sent: "4 streams (1,500 tokens with top_logprobs 100: about 7 MB each), SO_RCVBUF 4 KiB, never read; held queueTimeout + 5 s (20 s quick, 35 s full)",
            quick: true,
            run: slow_readers_streamed,
        },
        Attack {
            slug: "slow-readers-unstreamed",
            issue: "#2",
            sent: "4 non-streamed answers (1,500 tokens with top_logprobs 100), SO_RCVBUF 4 KiB, never read; held 35 s",
            quick: false,
            run: slow_readers_unstreamed,
        },
        Attack {
            slug: "fan-out",
            issue: "#3",
            sent: "/v1/completions: 120 prompts × n 5 = 600 tasks of 128 tokens (ignore_eos) in one request; full: then 4 chats with n 5 at once",
            quick: true,
            run: fan_out,
        },
        Attack {
            slug: "multipart-stream",
            issue: "#5",
            sent: "60 × Content-Type: multipart/mixed with a JSON body \"stream\": true (4 at once; the engine reads a body that is not form-data as JSON)",
            quick: true,
            run: multipart_stream,
        },
        Attack {
            slug: "unfinished-bodies",
            issue: "#6",
            sent: "Content-Length 8 MiB, 1 MiB sent, then silence: 40 connections quick / 120 full, held 10 s / 20 s",
            quick: true,
            run: unfinished_bodies,
        },
        Attack {
            slug: "slowloris",
            issue: "#6",
            sent: "one address, 150 quick / 400 full connections sending one header line a second (reconnecting), 10 s / 25 s",
            quick: false,
            run: slowloris,
        },
        Attack {
            slug: "upgrade-then-smuggle",
            issue: "#9",
            sent: "one connection: a request with Upgrade: websocket, then Content-Length + Transfer-Encoding; control: the second alone",
            quick: true,
            run: upgrade_then_smuggle,
        },
        Attack {
            slug: IDLE_AGENT_CONNECTIONS,
            issue: "#4",
            sent: "600 idle connections to the agent HTTP port (agent's soft fd limit 512), held 10 s quick / 20 s full",
            quick: true,
            run: idle_agent_connections,
        },
    ]
}

/// (what, path, body) of each nested-JSON request.
pub fn nested_requests() -> Vec<(&'static str, &'static str, String)> {
    let schema = payloads::nested_schema(DEEP);
    let arrays = payloads::nested_arrays(DEEP);
    let chat = |extra: &str| payloads::chat("hi", "4", extra);
    vec![
        ("json_schema", "/completion", format!(r#"{{"prompt":"hi","n_predict":4,"json_schema":{schema}}}"#)),
        (
            "response_format json_object schema",
            "/v1/chat/completions",
            chat(&format!(r#","response_format":{{"type":"json_object","schema":{schema}}}"#)),
        ),
        (
            "response_format json_schema",
            "/v1/chat/completions",
            chat(&format!(
                r#","response_format":{{"type":"json_schema","json_schema":{{"name":"x","schema":{schema}}}}}"#
            )),
        ),
        (
            "tools[].function.parameters",
            "/v1/chat/completions",
            chat(&format!(r#","tools":[{{"type":"function","function":{{"name":"f","parameters":{schema}}}}}]"#)),
        ),
        ("chat_template_kwargs", "/v1/chat/completions", chat(&format!(r#","chat_template_kwargs":{{"x":{arrays}}}"#))),
        ("top level", "/v1/chat/completions", chat(&format!(r#","x":{arrays}"#))),
        (
            "grammar",
            "/completion",
            format!(
                r#"{{"prompt":"hi","n_predict":4,"grammar":"{}"}}"#,
                payloads::nested_grammar(DEEP).replace('"', "\\\"")
            ),
        ),
    ]
}

fn nested_json(arena: &Arena) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let requests = nested_requests();
    let depths: Vec<String> =
        requests.iter().map(|(what, _, body)| format!("{what} {}", payloads::json_depth(body))).collect();
    tally.note(format!(
        "JSON depth of each body as sent (the grammar's nesting is in its string): {}",
        depths.join(", ")
    ));
    for (what, path, body) in requests {
        arena.probe(&mut tally, what, "POST", path, body.as_bytes());
    }
    Ok(tally)
}

fn nested_json_repeated(arena: &Arena) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let (_, path, body) = nested_requests().swap_remove(0);
    let wire = arena.wire("POST", path, body.as_bytes());
    let mut pids = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        if let Some(pid) = arena.watch.engine_pid()
            && !pids.contains(&pid)
        {
            pids.push(pid);
        }
        tally.answer(&arena.send(&wire, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    }
    tally.note(format!("{} engine processes seen during the attack", pids.len()));
    Ok(tally)
}

/// What an answer whose reader stopped turned out to be once read again: completed (its place
/// was held until now), ended by the agent (the place freed), or still going.
fn drain_label(s: &mut TcpStream, stream: bool, tally: &mut Tally) -> String {
    let a = net::read_answer(s, Instant::now() + Duration::from_secs(5), Instant::now());
    if let Some(status) = a.status.filter(|s| *s != 200) {
        // A refused request never became a slow reader: the row must not pass on it.
        tally.breaches.push(format!("a reader's request was answered {status}: the attack did not run"));
        return format!("refused {status}");
    }
    let ended = matches!(a.failure.as_deref(), None | Some("reset"));
    let complete = if stream { a.tail.contains("[DONE]") } else { a.tail.trim_end().ends_with('}') };
    match (ended, complete) {
        (true, true) => "completed once read again (held its place until then)".into(),
        (true, false) if a.tail.contains("stall") => "ended by the agent, with a stall event".into(),
        (true, false) => "ended by the agent".into(),
        (false, _) => "still open 5 s after reading again".into(),
    }
}

fn slow_readers(arena: &Arena, stream: bool) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    // Tokens quickly generated, with a large answer (100 alternatives each, the most the port
    // allows: about 7 MB, far more than the socket buffers): the engine is done long before
    // the hold ends, so what holds the places is the readers alone.
    let extra = format!(r#","stream":{stream},"ignore_eos":true,"logprobs":true,"top_logprobs":100"#);
    let wire =
        arena.wire("POST", "/v1/chat/completions", payloads::chat("Tell a long story.", "1500", &extra).as_bytes());
    let mut readers = Vec::new();
    for _ in 0..MAX_CONCURRENT {
        let mut s = net::connect(ATTACKER, arena.serving, Some(4096), Duration::from_secs(5))?;
        s.write_all(&wire)?;
        readers.push(s);
    }
    // Past the queue timeout, so a victim queued behind the held places is refused unless the
    // agent frees them, and well past the stall timeout, after which it must.
    let hold = arena.queue_timeout + Duration::from_secs(5);
    let started = Instant::now();
    let (mut at_limit, mut samples, mut engine_idle_from, mut engine_answered) = (0u32, 0u32, None, 0u32);
    while started.elapsed() < hold {
        std::thread::sleep(Duration::from_secs(1));
        samples += 1;
        let look = arena.watch.latest();
        if look.in_flight.is_some_and(|n| n >= u64::from(MAX_CONCURRENT)) {
            at_limit += 1;
        }
        let busy = look.internal_port.and_then(busy_slots);
        engine_answered += u32::from(busy.is_some());
        engine_idle_from = if busy == Some(0) { engine_idle_from.or(Some(samples)) } else { None };
    }
    tally.note(match engine_idle_from {
        Some(s) => format!("the engine's slots were all idle (its /slots) from second {s} of the hold to its end"),
        None if engine_answered == 0 => "the engine's /slots did not answer".into(),
        None => "the engine was still processing at the end of the hold".into(),
    });
    // The evidence that the readers really stopped: bytes waiting in their receive queues.
    let unread: Vec<String> = readers
        .iter()
        .map(|s| {
            s.local_addr().ok().and_then(net::unread_bytes).map_or("?".into(), |b| format!("{:.1}", b as f64 / 1024.0))
        })
        .collect();
    tally.note(format!("unread in the readers' receive queues at the end (KiB): {}", unread.join(", ")));
    tally.note(format!(
        "inFlight at the limit ({MAX_CONCURRENT}) in {at_limit} of {samples} one-second samples of the {} s hold",
        hold.as_secs()
    ));
    for s in &mut readers {
        let label = drain_label(s, stream, &mut tally);
        tally.count(label);
    }
    Ok(tally)
}

/// Slots the engine says are processing (its own `/slots`, asked directly on loopback).
fn busy_slots(engine_port: u16) -> Option<usize> {
    let a = net::exchange(VICTIM, engine_port, &net::request_bytes("GET", "/slots", &[], b""), Duration::from_secs(2));
    (a.status == Some(200)).then(|| a.body.matches(r#""is_processing":true"#).count())
}

fn slow_readers_streamed(arena: &Arena) -> anyhow::Result<Tally> {
    slow_readers(arena, true)
}

fn slow_readers_unstreamed(arena: &Arena) -> anyhow::Result<Tally> {
    slow_readers(arena, false)
}

fn fan_out(arena: &Arena) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let body = format!(r#"{{"prompt":{},"n":5,"max_tokens":128,"ignore_eos":true}}"#, payloads::prompt_array(120));
    arena.probe(&mut tally, "120 prompts × n 5", "POST", "/v1/completions", body.as_bytes());
    if !arena.quick {
        let chat =
            arena.wire("POST", "/v1/chat/completions", payloads::chat("Tell a story.", "64", r#","n":5"#).as_bytes());
        let answers: Vec<net::Answer> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..MAX_CONCURRENT).map(|_| s.spawn(|| arena.send(&chat, Duration::from_secs(45)))).collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        for a in &answers {
            tally.answer(a);
        }
    }
    Ok(tally)
}

fn multipart_stream(arena: &Arena) -> anyhow::Result<Tally> {
    let auth = format!("Bearer {ATTACKER_KEY}");
    let wire = net::request_bytes(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "multipart/mixed; boundary=x"), ("Authorization", &auth)],
        payloads::chat("Tell a story.", "32", r#","stream":true"#).as_bytes(),
    );
    let answers: Vec<net::Answer> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| (0..15).map(|_| arena.send(&wire, Duration::from_secs(45))).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).flatten().collect()
    });
    let mut tally = Tally::default();
    for a in &answers {
        tally.answer(a);
    }
    // The engine was healthy throughout: a 503 here is a request the agent lost on an engine
    // connection it should not have reused, and it counts towards the breaker.
    let lost = answers.iter().filter(|a| a.status == Some(503)).count();
    if lost > 0 {
        tally.breach(format!("{lost} requests lost with 503 on a healthy engine"));
    }
    Ok(tally)
}

const EIGHT_MIB: usize = 8 << 20;

fn unfinished_bodies(arena: &Arena) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let n = arena.size(40, 120);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ATTACKER_KEY}\r\nContent-Type: application/json\r\nContent-Length: {EIGHT_MIB}\r\n\r\n"
    );
    let mut part = br#"{"messages":[{"role":"user","content":""#.to_vec();
    part.resize(1 << 20, b'a');
    let mut held = Vec::new();
    for _ in 0..n {
        let sent = net::connect(ATTACKER, arena.serving, None, Duration::from_secs(5)).and_then(|mut s| {
            s.set_write_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(head.as_bytes())?;
            s.write_all(&part)?;
            Ok(s)
        });
        match sent {
            Ok(s) => held.push(s),
            Err(e) => tally.count(format!("not sent: {}", e.root_cause())),
        }
    }
    tally.note(format!("{} connections each holding 1 MiB of an 8 MiB body", held.len()));
    std::thread::sleep(arena.seconds(10, 20));
    for s in &mut held {
        // An answer before the body is complete is a refusal (the bound at work), else held.
        let a = net::read_answer(s, Instant::now() + Duration::from_millis(50), Instant::now());
        match a.status {
            Some(_) => tally.answer(&a),
            None => tally.count("held, no answer"),
        }
    }
    Ok(tally)
}

fn slowloris(arena: &Arena) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let n = arena.size(150, 400);
    let open = |tally: &mut Tally| -> Option<TcpStream> {
        let s = net::connect(ATTACKER, arena.serving, None, Duration::from_secs(2)).and_then(|mut s| {
            s.set_write_timeout(Some(Duration::from_millis(200)))?;
            s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")?;
            Ok(s)
        });
        match s {
            Ok(s) => {
                tally.count("connections opened");
                Some(s)
            }
            Err(e) => {
                tally.count(format!("connect failed: {}", e.root_cause()));
                None
            }
        }
    };
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| open(&mut tally)).collect();
    let mut reconnects = 0;
    let started = Instant::now();
    while started.elapsed() < arena.seconds(10, 25) {
        std::thread::sleep(Duration::from_secs(1));
        for c in &mut conns {
            let alive = c.as_mut().is_some_and(|s| s.write_all(b"X-Slow: 1\r\n").is_ok());
            if !alive {
                if c.is_some() {
                    tally.count("closed by the agent");
                }
                // Bounded: at most three times as many connections as held at once.
                *c = if reconnects < 2 * n {
                    reconnects += 1;
                    open(&mut tally)
                } else {
                    None
                };
            }
        }
    }
    Ok(tally)
}

fn upgrade_then_smuggle(arena: &Arena) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let body = payloads::chat("hi", "4", "");
    let upgrade = format!(
        "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ATTACKER_KEY}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    // Both framings: a length that would end the body early, and chunked.
    let ambiguous = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ATTACKER_KEY}\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    for (what, wire) in [("after an upgrade request", format!("{upgrade}{ambiguous}")), ("alone (control)", ambiguous)]
    {
        let mut s = net::connect(ATTACKER, arena.serving, None, Duration::from_secs(5))?;
        s.write_all(wire.as_bytes())?;
        let statuses = statuses(&mut s);
        let last = statuses.last().copied();
        let verdict = match last {
            Some(200) => "SERVED",
            Some(400) => "refused 400",
            _ => "other",
        };
        if last == Some(200) {
            tally.breach(format!("the ambiguous request was served {what}"));
        }
        tally.count(format!("{what}: {} → ambiguous request {verdict}", join(&statuses)));
    }
    Ok(tally)
}

/// Status codes of every response on a connection, in order, until it closes (10 s at most).
fn statuses(s: &mut TcpStream) -> Vec<u16> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while Instant::now() < deadline {
        let _ =
            s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))));
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n.min(1 << 20)]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&raw)
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|r| r.get(..3).and_then(|c| c.parse().ok()))
        .collect()
}

fn join(statuses: &[u16]) -> String {
    if statuses.is_empty() {
        return "no answer".into();
    }
    statuses.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
}

fn idle_agent_connections(arena: &Arena) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let mut conns = Vec::new();
    for _ in 0..600 {
        match net::connect(ATTACKER, arena.api, None, Duration::from_secs(2)) {
            Ok(s) => conns.push(s),
            Err(e) => tally.count(format!("connect failed: {}", e.root_cause())),
        }
    }
    std::thread::sleep(arena.seconds(10, 20));
    for s in &mut conns {
        let _ = s.set_nonblocking(true);
        let mut b = [0u8; 1];
        tally.count(match s.read(&mut b) {
            Ok(0) => "closed by the agent",
            Err(e) if e.kind() == ErrorKind::WouldBlock => "still open at the end",
            Ok(_) => "answered unasked",
            Err(_) => "reset",
        });
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nested_request_is_nested_as_deep_as_the_issue_says() {
        for (what, _, body) in nested_requests() {
            if what == "grammar" {
                // The nesting is inside the grammar string: parentheses, not JSON.
                assert!(body.matches('(').count() >= DEEP, "{what}");
                assert_eq!(payloads::json_depth(&body), 1);
            } else {
                assert!(payloads::json_depth(&body) > 20_000, "{what}: {}", payloads::json_depth(&body));
            }
        }
    }
}
