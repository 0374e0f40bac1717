//! Three mantissa nodes in one process: write on one, watch the change arrive on the others.
//!
//! Run with `cargo run --release --example embedded`.

use std::net::SocketAddr;
use std::time::Duration;

use mantissa::crdt::{Change, Value};
use mantissa::runtime::{ClusterCa, NodeConfig, TlsConfig, start};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One cluster CA, one certificate per node: a node's name is what its certificate says.
    let ca = ClusterCa::generate("example")?;
    let any_port: SocketAddr = "127.0.0.1:0".parse()?;
    let credentials = |name: &str| -> Result<TlsConfig, Box<dyn std::error::Error>> {
        let node = ca.issue(name, Duration::from_secs(24 * 3600))?;
        Ok(TlsConfig::new(ca.cert_pem(), &node)?)
    };

    let first = start(NodeConfig::new(any_port, credentials("node-a")?, vec![])).await?;
    let seeds = vec![first.addr()];
    let second = start(NodeConfig::new(
        any_port,
        credentials("node-b")?,
        seeds.clone(),
    ))
    .await?;
    let third = start(NodeConfig::new(any_port, credentials("node-c")?, seeds)).await?;
    println!(
        "started {} ({}), {} and {}",
        first.name(),
        first.addr(),
        second.name(),
        third.name()
    );

    let mut watch_b = second.watch("services/", None).await?;
    let mut watch_c = third.watch("services/", None).await?;

    let token = first.put("services/web/replicas", "3").await?;
    println!("node-a wrote services/web/replicas = 3 (token {token})");

    for (name, watch) in [("node-b", &mut watch_b), ("node-c", &mut watch_c)] {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await?
            .ok_or("node stopped")??;
        if let Change::Put(Value::Register(register)) = event.change {
            println!(
                "{name} saw {} = {} (cursor {})",
                event.key,
                String::from_utf8_lossy(&register.value),
                event.cursor
            );
        }
    }

    // A client that moves from node-a to node-c reads its own write by carrying the token.
    third.wait_for(&token, Duration::from_secs(10)).await?;
    println!(
        "node-c covers the token: {:?}",
        third.get("services/web/replicas").await?.map(|v| v.kind())
    );

    for node in [third, second, first] {
        node.shutdown().await?;
    }
    Ok(())
}
