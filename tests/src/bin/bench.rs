//! `make bench`: throughput of reading a 1 KB secret, side by side with its peers, in one run
//! on one private cluster, with pgbench custom scripts. Ratios are what to read: the machine
//! is shared and noisy, absolute numbers are not comparable between runs.
//!
//! The rows run in turn, round after round; each round's ratios compare runs seconds apart,
//! and the median over rounds is reported, which keeps a noisy neighbour from deciding the
//! result. Environment: BENCH_SECONDS (per run, default 4), BENCH_CLIENTS (default 2),
//! BENCH_ROUNDS (default 5).

use pg_secrets_e2e::Cluster;
use std::fs;

const ROWS: i32 = 1000;

struct Row {
    name: &'static str,
    script: &'static str,
}

const ROWS_UNDER_TEST: &[Row] = &[
    Row {
        name: "plain SELECT value FROM t WHERE name = $1",
        script: "SELECT value FROM plain_values WHERE name = 'bench/' || :i;",
    },
    Row {
        name: "secrets.get_secret_value(name)",
        script: "SELECT secrets.get_secret_value('bench/' || :i);",
    },
    Row {
        name: "pgcrypto pgp_sym_decrypt(value, key)",
        script: "SELECT pgp_sym_decrypt(value, 'bench-passphrase') FROM pgcrypto_values WHERE name = 'bench/' || :i;",
    },
];

fn env_number(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let seconds = env_number("BENCH_SECONDS", 4);
    let clients = env_number("BENCH_CLIENTS", 2);
    let rounds = env_number("BENCH_ROUNDS", 5);
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(&format!(
        "CREATE EXTENSION pgcrypto;
         CREATE TABLE plain_values (name text PRIMARY KEY, value text NOT NULL);
         INSERT INTO plain_values SELECT 'bench/' || i, repeat(md5(i::text), 32) FROM generate_series(1, {ROWS}) i;
         CREATE TABLE pgcrypto_values (name text PRIMARY KEY, value bytea NOT NULL);
         INSERT INTO pgcrypto_values SELECT name, pgp_sym_encrypt(value, 'bench-passphrase') FROM plain_values;
         SELECT secrets.create_secret(name, value) FROM plain_values;"
    ))
    .unwrap();
    db.batch_execute("VACUUM ANALYZE").unwrap();

    let scripts = cluster.dir().join("bench");
    fs::create_dir_all(&scripts).unwrap();
    // tps[row][round]
    let mut tps = vec![Vec::new(); ROWS_UNDER_TEST.len()];
    for round in 1..=rounds {
        for (index, row) in ROWS_UNDER_TEST.iter().enumerate() {
            let script = scripts.join(format!("{index}.sql"));
            fs::write(
                &script,
                format!("\\set i random(1, {ROWS})\n{}\n", row.script),
            )
            .unwrap();
            let output = cluster
                .client_program("pgbench")
                .args([
                    "-n",
                    "-M",
                    "prepared",
                    "-c",
                    &clients.to_string(),
                    "-j",
                    &clients.to_string(),
                ])
                .args(["-T", &seconds.to_string(), "-f"])
                .arg(&script)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "pgbench failed: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let measured = stdout
                .lines()
                .find(|line| line.starts_with("tps = "))
                .and_then(|line| line.split_whitespace().nth(2))
                .and_then(|tps| tps.parse::<f64>().ok())
                .expect("pgbench printed no tps line");
            eprintln!("round {round}: {:<45} {measured:>10.0} tps", row.name);
            tps[index].push(measured);
        }
    }

    println!();
    println!(
        "Reading a 1 KB value: pgbench -M prepared, {clients} clients, {seconds} s per run, \
         median of {rounds} rounds"
    );
    println!("| what | reads/s | ratio to plain lookup |");
    println!("| --- | ---: | ---: |");
    for (row, row_tps) in ROWS_UNDER_TEST.iter().zip(&tps) {
        let ratios: Vec<f64> = row_tps
            .iter()
            .zip(&tps[0])
            .map(|(tps, plain)| tps / plain)
            .collect();
        println!(
            "| {} | {:.0} | {:.2} |",
            row.name,
            median(row_tps),
            median(&ratios)
        );
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
