//! `make run`, as a new user would meet it: `scripts/demo.sh start` (what `make run` runs once
//! the extension is installed and the proxy built) in a directory of its own, on free ports.
//! The cluster, the key, the sample secret and secrets-proxy come up; an application logs in
//! through the proxy with no password, across a rotation; a second start reuses everything;
//! `stop` stops it all.

use pg_secrets_e2e::{free_port, server_temp_dir, Client, NoTls};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Demo {
    _dir: tempfile::TempDir,
    root: PathBuf,
    port: u16,
    proxy_port: u16,
}

impl Demo {
    /// `demo.sh action`, whatever its outcome.
    fn run(&self, action: &str) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
        Command::new(script)
            .arg(action)
            .env("PG_SECRETS_DEMO_DIR", &self.root)
            .env("PG_SECRETS_PORT", self.port.to_string())
            .env("SECRETS_PROXY_PORT", self.proxy_port.to_string())
            .output()
            .unwrap()
    }

    fn script(&self, action: &str) -> Output {
        let output = self.run(action);
        assert!(
            output.status.success(),
            "demo.sh {action}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn start(&self) -> String {
        let output = self.script("start");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("did not start"), "{stderr}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The database superuser over the demo's Unix socket, as the printed psql line does.
    fn superuser(&self) -> Client {
        Client::connect(
            &format!(
                "host={} port={} user=postgres dbname=postgres",
                self.root.display(),
                self.port
            ),
            NoTls,
        )
        .unwrap()
    }

    /// An application through secrets-proxy, with no password.
    fn application(&self) -> Client {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=anyone dbname=demo",
                self.proxy_port
            ),
            NoTls,
        )
        .unwrap()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh"))
            .arg("stop")
            .env("PG_SECRETS_DEMO_DIR", &self.root)
            .output();
    }
}

#[test]
fn make_run_starts_the_product_and_a_second_run_reuses_it() {
    let dir = server_temp_dir("pg_secrets-demo-");
    // Two ports apart: the proxy's admin port is the one after its client port.
    let proxy_port = loop {
        let port = free_port();
        if std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            break port;
        }
    };
    let demo = Demo {
        root: dir.path().join("pg"),
        _dir: dir,
        port: free_port(),
        proxy_port,
    };
    let printed = demo.start();
    assert!(printed.contains("created a new master key"), "{printed}");
    assert!(printed.contains("pg_secrets is running"), "{printed}");
    let key = std::fs::metadata(demo.root.join("master.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);

    let user: String = demo
        .application()
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(user, "app", "the proxy logs in with the sample credential");

    // What the printed "Try:" lines suggest: a rotation, and the proxy keeps working.
    let mut db = demo.superuser();
    let before: String = db
        .query_one("SELECT secrets.get_secret_value('demo/app/db')", &[])
        .unwrap()
        .get(0);
    db.batch_execute("SELECT secrets.rotate_secret('demo/app/db')")
        .unwrap();
    let after: String = db
        .query_one("SELECT secrets.get_secret_value('demo/app/db')", &[])
        .unwrap()
        .get(0);
    assert_ne!(before, after, "rotate_secret changed the password");
    demo.application().query_one("SELECT 1", &[]).unwrap();
    let pooled = Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=pooled dbname=demo",
            demo.proxy_port
        ),
        NoTls,
    );
    pooled.unwrap().query_one("SELECT 1", &[]).unwrap();
    drop(db);

    // Again: the same cluster, key and secret, and nothing created anew.
    let printed = demo.start();
    assert!(!printed.contains("created a new master key"), "{printed}");
    let mut db = demo.superuser();
    let kept: String = db
        .query_one("SELECT secrets.get_secret_value('demo/app/db')", &[])
        .unwrap()
        .get(0);
    assert_eq!(kept, after);
    demo.application().query_one("SELECT 1", &[]).unwrap();
    drop(db);

    let stopped = demo.script("stop");
    let stopped = String::from_utf8_lossy(&stopped.stdout);
    assert!(
        stopped.contains("stopped the pg_secrets demo cluster"),
        "{stopped}"
    );
    assert!(stopped.contains("stopped secrets-proxy"), "{stopped}");
    assert!(Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=anyone dbname=demo connect_timeout=5",
            demo.proxy_port
        ),
        NoTls
    )
    .is_err());
}

#[test]
fn a_folder_too_deep_for_the_servers_socket_is_refused_before_anything_is_made() {
    let dir = server_temp_dir("pg_secrets-demo-");
    // The socket would be this folder, "/.s.PGSQL.", and the port: past 107 bytes.
    let root = dir.path().join("d".repeat(100));
    let demo = Demo {
        root,
        _dir: dir,
        port: free_port(),
        proxy_port: free_port(),
    };
    let output = demo.run("start");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("longer than a Unix socket path may be (107 bytes)")
            && stderr.contains("PG_SECRETS_DEMO_DIR"),
        "{stderr}"
    );
    assert!(!demo.root.exists(), "nothing was created");
}
