//! Durable storage through the embedded node: what a node acknowledged survives a restart, a
//! damaged data file is refused (or moved aside on request), and a restarted node writes under a
//! new id.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mantissa::crdt::Value;
use mantissa::runtime::{
    ClusterCa, Handle, NodeConfig, StartError, StorageConfig, StorageError, TlsConfig, start,
};

const PATIENCE: Duration = Duration::from_secs(20);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mantissa-durable-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn config(
    ca: &ClusterCa,
    name: &str,
    storage: StorageConfig,
    seeds: Vec<SocketAddr>,
) -> NodeConfig {
    let node = ca.issue(name, Duration::from_secs(3600)).expect("issue");
    let tls = TlsConfig::new(ca.cert_pem(), &node).expect("tls config");
    let mut config = NodeConfig::new(any_port(), tls, seeds);
    config.storage = Some(storage);
    config
}

async fn register(node: &Handle, key: &str) -> Option<Vec<u8>> {
    match node.get(key).await.expect("get") {
        Some(Value::Register(register)) => Some(register.value.to_vec()),
        None => None,
        Some(other) => panic!("{key} holds {other:?}"),
    }
}

fn data_file(dir: &Path) -> PathBuf {
    dir.join("mantissa.redb")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_restart_and_the_node_writes_under_a_new_id() {
    let ca = ClusterCa::generate("test").expect("ca");
    let dir = scratch("restart");
    let node = start(config(&ca, "node-a", StorageConfig::new(&dir), vec![]))
        .await
        .expect("start");
    let first_id = node.status().await.expect("status").me.replica;
    for i in 0..300 {
        node.put(format!("k/{i:03}"), format!("v{i}"))
            .await
            .expect("put");
    }
    node.counter_add("hits", 7).await.expect("counter");
    node.delete("k/000").await.expect("delete");
    let status = node.status().await.expect("status");
    let storage = status.storage.expect("storage stats");
    assert!(storage.commits >= 1, "{storage:?}");
    assert!(storage.deltas_written >= 302, "{storage:?}");
    node.shutdown().await.expect("shutdown");

    let node = start(config(&ca, "node-a", StorageConfig::new(&dir), vec![]))
        .await
        .expect("restart");
    let status = node.status().await.expect("status");
    assert_ne!(
        status.me.replica, first_id,
        "a restarted node must not reuse its dots"
    );
    assert_eq!(
        status.version.get(first_id),
        302,
        "the old incarnation's writes are all there"
    );
    assert_eq!(register(&node, "k/000").await, None, "the delete survived");
    for i in 1..300 {
        assert_eq!(
            register(&node, &format!("k/{i:03}")).await,
            Some(format!("v{i}").into_bytes())
        );
    }
    assert_eq!(
        node.get("hits").await.expect("get"),
        Some(Value::Counter(7))
    );
    let token = node.put("k/new", "after restart").await.expect("put");
    assert_eq!(
        token.get(status.me.replica),
        1,
        "the new incarnation starts its own dots"
    );
    node.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_data_file_is_refused_and_moved_aside_only_on_request() {
    let ca = ClusterCa::generate("test").expect("ca");
    let dir = scratch("damaged");
    let node = start(config(&ca, "node-a", StorageConfig::new(&dir), vec![]))
        .await
        .expect("start");
    node.put("k", "v").await.expect("put");
    // Enough data that the file is mostly live pages, so damage in its middle hits them.
    for i in 0..400 {
        node.put(format!("fill/{i}"), vec![b'x'; 1000])
            .await
            .expect("put");
    }
    node.shutdown().await.expect("shutdown");

    let file = data_file(&dir);
    let intact = std::fs::read(&file).expect("data file");
    std::fs::write(&file, &intact[..intact.len() / 2]).expect("truncate");
    let refused = start(config(&ca, "node-a", StorageConfig::new(&dir), vec![])).await;
    assert!(
        matches!(&refused, Err(StartError::Storage(StorageError::Corrupted { path, .. })) if *path == file),
        "a truncated data file must be refused: {:?}",
        refused.err()
    );

    // Damage in the middle (the storage engine may panic on it): the node refuses to start, or
    // the damage missed everything live and every value is intact. Never a silent loss.
    let mut damaged = intact.clone();
    for offset in (damaged.len() / 4..damaged.len() * 3 / 4).step_by(8192) {
        damaged[offset..offset + 64].fill(0x5a);
    }
    std::fs::write(&file, &damaged).expect("damage");
    match start(config(&ca, "node-a", StorageConfig::new(&dir), vec![])).await {
        Err(StartError::Storage(StorageError::Corrupted { path, .. })) => assert_eq!(path, file),
        Err(other) => panic!("expected a corrupted-file error, got {other}"),
        Ok(node) => {
            assert_eq!(register(&node, "k").await, Some(b"v".to_vec()));
            for i in 0..400 {
                let value = register(&node, &format!("fill/{i}")).await;
                assert_eq!(value, Some(vec![b'x'; 1000]), "fill/{i} silently damaged");
            }
            node.shutdown().await.expect("shutdown");
        }
    }

    let len = intact.len();
    let garbage = vec![0xa5u8; len as usize];
    std::fs::write(&file, &garbage).expect("overwrite");
    let refused = start(config(&ca, "node-a", StorageConfig::new(&dir), vec![])).await;
    match refused {
        Err(StartError::Storage(StorageError::Corrupted { path, .. })) => assert_eq!(path, file),
        Err(other) => panic!("expected a corrupted-file error, got {other}"),
        Ok(_) => panic!("a garbage data file was accepted"),
    }
    assert_eq!(
        std::fs::read(&file).expect("still there"),
        garbage,
        "nothing was changed"
    );

    let mut storage = StorageConfig::new(&dir);
    storage.discard_corrupt = true;
    let node = start(config(&ca, "node-a", storage, vec![]))
        .await
        .expect("start after moving the file aside");
    assert_eq!(register(&node, "k").await, None);
    node.shutdown().await.expect("shutdown");
    let kept: Vec<_> = std::fs::read_dir(&dir)
        .expect("list")
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().contains("corrupt"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged file is kept aside, not deleted");
    assert_eq!(std::fs::read(kept[0].path()).expect("read"), garbage);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_with_what_it_missed() {
    let ca = ClusterCa::generate("test").expect("ca");
    let dir_a = scratch("catch-up-a");
    let dir_b = scratch("catch-up-b");
    let a = start(config(&ca, "node-a", StorageConfig::new(&dir_a), vec![]))
        .await
        .expect("start a");
    let b = start(config(
        &ca,
        "node-b",
        StorageConfig::new(&dir_b),
        vec![a.addr()],
    ))
    .await
    .expect("start b");
    let token = a.put("before", "1").await.expect("put");
    b.wait_for(&token, PATIENCE)
        .await
        .expect("b sees the write");
    b.shutdown().await.expect("stop b");
    let missed = a.put("while-down", "2").await.expect("put");
    let b = start(config(
        &ca,
        "node-b",
        StorageConfig::new(&dir_b),
        vec![a.addr()],
    ))
    .await
    .expect("restart b");
    assert_eq!(
        register(&b, "before").await,
        Some(b"1".to_vec()),
        "from its own disk"
    );
    b.wait_for(&missed, PATIENCE).await.expect("b catches up");
    assert_eq!(register(&b, "while-down").await, Some(b"2".to_vec()));
    for node in [a, b] {
        node.shutdown().await.expect("shutdown");
    }
    let _ = std::fs::remove_dir_all(&dir_a);
    let _ = std::fs::remove_dir_all(&dir_b);
}
