//! The connection's security: TLS with a private CA and client certificates, user/password,
//! token and nkey authentication, and secrets kept out of the logs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use mailroom::nats_server::{NatsServer, ServerOptions};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::support::{target_dir, wasm, workspace};

/// Writes a throwaway CA, a server certificate for 127.0.0.1 and a client certificate.
fn pki(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca, &ca_key);
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    write("ca.pem", ca_cert.pem());
    for (name, sans) in [
        (
            "server",
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        ),
        ("client", vec!["mailroom-client".to_owned()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        write(&format!("{name}.pem"), cert.pem());
        write(&format!("{name}-key.pem"), key.serialize_pem());
    }
}

const STREAM_AND_HANDLER: &str = r#"
[[stream]]
name = "JOBS"
subjects = ["jobs.>"]

[[handler]]
name = "flaky"
module = "{flaky}"
stream = "JOBS"
concurrency = 2
"#;

fn host_config(nats: &str) -> String {
    format!("{nats}\n{STREAM_AND_HANDLER}").replace("{flaky}", &wasm("flaky").display().to_string())
}

/// Connects with the config's options, runs the host, and checks one message gets acked.
async fn round_trip(config_text: &str, url: &str) {
    let mut config = mailroom::Config::parse(config_text, &workspace()).unwrap();
    config.nats.url = url.to_owned();
    config.host.cache_dir = Some(target_dir().join("mailroom-test-cache"));
    let client = mailroom::connect::connect(&config.nats)
        .await
        .expect("connects with auth");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let host = mailroom::start(config, client.clone(), shutdown.clone())
        .await
        .unwrap();
    let js = jetstream::new(client);
    js.publish("jobs.secure", "ok".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while host.metrics().snapshot()[0].1.succeeded < 1 {
        assert!(Instant::now() < deadline, "{:?}", host.metrics().snapshot());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    host.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_private_ca_and_user_password() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let d = dir.path().display();
    let server = NatsServer::start_with(ServerOptions {
        extra_config: format!(
            r#"
tls {{
  cert_file: "{d}/server.pem"
  key_file: "{d}/server-key.pem"
  ca_file: "{d}/ca.pem"
  verify: true
}}
authorization {{
  users = [ {{ user: "mailroom", password: "s3cret-pw" }} ]
}}
"#
        ),
    })
    .unwrap();
    let nats = format!(
        r#"[nats]
user = "mailroom"
password = "s3cret-pw"
tls = {{ ca = "{d}/ca.pem", cert = "{d}/client.pem", key = "{d}/client-key.pem" }}
"#
    );
    round_trip(&host_config(&nats), &server.url()).await;

    // The binary too, and the password never reaches its log.
    let config_path = dir.path().join("mailroom.toml");
    std::fs::write(&config_path, host_config(&nats)).unwrap();
    let log_path = dir.path().join("host.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .env(
            "XDG_CACHE_HOME",
            target_dir().join("mailroom-test-cache-cli"),
        )
        .env("MAILROOM_LOG", "trace")
        .args(["run", "--config"])
        .arg(&config_path)
        .arg("--nats-url")
        .arg(server.url())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("handler started")
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("connected to NATS"), "{log}");
    assert!(
        !log.contains("s3cret-pw"),
        "the password was logged:\n{log}"
    );

    // Without the client certificate the server refuses us, with a clear error.
    let mut config = mailroom::Config::parse(
        &host_config(&format!(
            "[nats]\nuser = \"mailroom\"\npassword = \"s3cret-pw\"\ntls = {{ ca = \"{d}/ca.pem\" }}\n"
        )),
        &workspace(),
    )
    .unwrap();
    config.nats.url = server.url();
    let err = mailroom::connect::connect(&config.nats).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot connect to NATS"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_authentication() {
    let server = NatsServer::start_with(ServerOptions {
        extra_config: "authorization { token: \"t0ken-value\" }".into(),
    })
    .unwrap();
    round_trip(
        &host_config("[nats]\ntoken = \"t0ken-value\"\n"),
        &server.url(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_authentication() {
    let user = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with(ServerOptions {
        extra_config: format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
            user.public_key()
        ),
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    round_trip(
        &host_config(&format!(
            "[nats]\nnkey_seed_file = \"{}\"\n",
            seed.display()
        )),
        &server.url(),
    )
    .await;
}
