//! Under torchrun: the ranks join the c10d `TCPStore` its elastic agent serves, as clients,
//! and a failing rank leaves its error where the agent reads it.
//!
//! The store here is a small server written in this file from PyTorch's protocol
//! (`TCPStoreBackend.hpp`: a query-type byte, little-endian integers, `u64`-length-prefixed
//! keys and values; VALIDATE first, unanswered; SET unanswered; GET on a missing key closes
//! the connection, as PyTorch's legacy server does), so the client is checked against the
//! protocol, not against itself. PyTorch is too heavy for CI; docs/launching.md records a run
//! under the real torchrun.

use candle_core::{Device, Tensor};
use candle_fsdp::dist::{AgentStore, DistEnv, ReduceOp};
use candle_fsdp::{Backend, ProcessGroup};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Keys = Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>;

fn u64_le(stream: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    stream.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn blob(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut v = vec![0u8; u64_le(stream)? as usize];
    stream.read_exact(&mut v)?;
    Ok(v)
}

fn reply_blob(stream: &mut TcpStream, v: &[u8]) -> std::io::Result<()> {
    stream.write_all(&(v.len() as u64).to_le_bytes())?;
    stream.write_all(v)
}

/// One client connection of the test server.
fn serve(mut stream: TcpStream, keys: Keys) -> std::io::Result<()> {
    let mut opening = [0u8; 5];
    stream.read_exact(&mut opening)?;
    if opening != [0, 0xCE, 0xF7, 0x85, 0x3C] {
        return Ok(()); // not validated: close, as PyTorch's server does
    }
    loop {
        let mut query = [0u8; 1];
        if stream.read_exact(&mut query).is_err() {
            return Ok(());
        }
        match query[0] {
            1 => {
                let (k, v) = (blob(&mut stream)?, blob(&mut stream)?);
                keys.lock().unwrap().insert(k, v);
            }
            2 => {
                let (k, expected, desired) = (blob(&mut stream)?, blob(&mut stream)?, blob(&mut stream)?);
                let mut map = keys.lock().unwrap();
                let now = match map.get(&k) {
                    None if expected.is_empty() => {
                        map.insert(k, desired.clone());
                        desired
                    }
                    None => expected,
                    Some(current) if *current == expected => {
                        map.insert(k, desired.clone());
                        desired
                    }
                    Some(current) => current.clone(),
                };
                drop(map);
                reply_blob(&mut stream, &now)?;
            }
            3 => {
                let k = blob(&mut stream)?;
                let value = keys.lock().unwrap().get(&k).cloned();
                match value {
                    Some(v) => reply_blob(&mut stream, &v)?,
                    None => return Ok(()), // undefined: the legacy server throws and closes
                }
            }
            4 => {
                let k = blob(&mut stream)?;
                let mut delta = [0u8; 8];
                stream.read_exact(&mut delta)?;
                let mut map = keys.lock().unwrap();
                let old: i64 = map.get(&k).map(|v| String::from_utf8_lossy(v).parse().unwrap()).unwrap_or(0);
                let new = old + i64::from_le_bytes(delta);
                map.insert(k, new.to_string().into_bytes());
                drop(map);
                stream.write_all(&new.to_le_bytes())?;
            }
            5 => {
                let count = u64_le(&mut stream)?;
                let wanted: Vec<Vec<u8>> = (0..count).map(|_| blob(&mut stream)).collect::<std::io::Result<_>>()?;
                let map = keys.lock().unwrap();
                let ready = wanted.iter().all(|k| map.contains_key(k));
                drop(map);
                stream.write_all(&[if ready { 0 } else { 1 }])?;
            }
            _ => return Ok(()), // unknown query: close
        }
    }
}

/// A c10d store on a free port: its address and the keys it holds.
fn agent_store() -> (u16, Keys) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let keys: Keys = Arc::default();
    let served = keys.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let keys = served.clone();
            std::thread::spawn(move || serve(stream, keys));
        }
    });
    (port, keys)
}

/// Three ranks of attempt `attempt` join the store as torchrun's workers would, sum
/// their ranks over TCP and finish; returns each rank's sum.
fn attempt(port: u16, attempt: u32) -> Vec<f32> {
    let handles: Vec<_> = (0..3)
        .map(|rank| {
            std::thread::spawn(move || {
                let env = DistEnv {
                    rank,
                    world_size: 3,
                    local_rank: rank,
                    local_world_size: 3,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    agent_store: Some(AgentStore { run_id: "run-7".into(), restart_count: attempt }),
                };
                let group = ProcessGroup::join(env, Backend::Tcp, Duration::from_secs(20)).unwrap();
                let ctx = group.context();
                let mine = Tensor::new(&[rank as f32 + 1.0], &Device::Cpu).unwrap();
                let sum = ctx.comm.all_reduce(&mine, ReduceOp::Sum, "test").unwrap().wait().unwrap();
                group.finish().unwrap();
                sum.to_vec1::<f32>().unwrap()[0]
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn ranks_meet_through_the_agents_store_and_a_restarted_attempt_reads_only_its_own_keys() {
    let (port, keys) = agent_store();
    assert_eq!(attempt(port, 0), [6.0, 6.0, 6.0]);
    let first: Vec<String> = keys.lock().unwrap().keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    assert!(!first.is_empty());
    for key in &first {
        assert!(key.starts_with("/candle-fsdp/run-7/attempt_0/"), "key `{key}` outside the attempt's namespace");
    }
    // The restarted attempt finds the first attempt's keys (its "complete" markers too)
    // still in the store, and must not take them for its own.
    assert_eq!(attempt(port, 1), [6.0, 6.0, 6.0]);
    let second = keys.lock().unwrap().keys().filter(|k| k.starts_with(b"/candle-fsdp/run-7/attempt_1/")).count();
    assert!(second > 0, "the second attempt used its own namespace");
}

#[test]
fn torchruns_variables_select_the_agent_store() {
    let vars: HashMap<&str, &str> = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RUN_ID", "abc"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ]
    .into();
    let env = DistEnv::from_vars(|name| vars.get(name).map(|v| v.to_string())).unwrap();
    let agent = env.agent_store.expect("the agent store");
    assert_eq!((agent.run_id.as_str(), agent.restart_count), ("abc", 2));
    assert_eq!(agent.namespace(), "candle-fsdp/abc/attempt_2");
    let without = DistEnv::from_vars(|name| {
        (name != "TORCHELASTIC_USE_AGENT_STORE").then(|| vars.get(name).map(|v| v.to_string())).flatten()
    })
    .unwrap();
    assert_eq!(without.agent_store, None, "without the agent's store, rank 0 serves its own");
}

#[test]
fn the_error_file_has_the_shape_torchrun_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("attempt_0/1/error.json");
    candle_fsdp::dist::write_error_file(&path, 1, "rank 1: the loss is NaN").unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let message = &json["message"];
    assert!(message["message"].as_str().unwrap().contains("rank 1: the loss is NaN"));
    assert!(message["extraInfo"]["py_callstack"].as_str().unwrap().contains("the loss is NaN"));
    // torchrun parses the timestamp with int() and orders the failures by it.
    let timestamp: u64 = message["extraInfo"]["timestamp"].as_str().unwrap().parse().unwrap();
    assert!(timestamp > 1_700_000_000);
}
