//! `mantissa demo`: two in-process replicas write concurrently and merge.

use std::time::{SystemTime, UNIX_EPOCH};

use mantissa::crdt::{Key, NodeId, Replica, Value};

/// Runs the demo, printing each step.
pub fn run() -> Result<(), mantissa::crdt::Error> {
    let mut east = Replica::new(NodeId(1));
    let mut west = Replica::new(NodeId(2));
    let replicas = Key::new("services/web/replicas")?;
    let placements = Key::new("jobs/web/placements")?;

    println!("Two replicas, east and west, write concurrently without talking to each other:");
    let e1 = east.put(replicas.clone(), b"3".to_vec(), now_millis())?;
    let w1 = west.put(replicas.clone(), b"5".to_vec(), now_millis())?;
    let e2 = east.set_add(
        placements.clone(),
        vec![b"web-1@host-a".to_vec()],
        now_millis(),
    )?;
    let w2 = west.set_add(
        placements.clone(),
        vec![b"web-2@host-b".to_vec()],
        now_millis(),
    )?;
    println!("  east: put {replicas} = 3, add web-1@host-a to {placements}");
    println!("  west: put {replicas} = 5, add web-2@host-b to {placements}");

    println!(
        "They exchange deltas ({} bytes in all) and merge:",
        [&e1, &e2, &w1, &w2]
            .iter()
            .map(|d| d.encode().len())
            .sum::<usize>()
    );
    for delta in [w1, w2] {
        east.apply(delta)?;
    }
    for delta in [e1, e2] {
        west.apply(delta)?;
    }
    for (name, replica) in [("east", &east), ("west", &west)] {
        print!("  {name}: ");
        if let Some(Value::Register(register)) = replica.get(&replicas)? {
            print!(
                "{replicas} = {} (concurrent sibling: {}); ",
                String::from_utf8_lossy(&register.value),
                register
                    .siblings
                    .iter()
                    .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(Value::Set(elements)) = replica.get(&placements)? {
            let shown: Vec<_> = elements
                .iter()
                .map(|e| String::from_utf8_lossy(e).into_owned())
                .collect();
            print!("{placements} = {{{}}}", shown.join(", "));
        }
        println!("  [state digest {:016x}]", replica.digest());
    }
    println!("Both replicas pick the same winner and hold the same state: no leader was asked.");
    Ok(())
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}
