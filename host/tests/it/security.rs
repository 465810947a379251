//! The connection's security: TLS with a private CA and client certificates, user/password,
//! token, nkey and credentials-file (JWT) authentication, and secrets kept out of the logs.

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
        ..Default::default()
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
        ..Default::default()
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
        ..Default::default()
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

/// Base64url without padding, as JWTs use it.
fn base64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

/// A NATS JWT (`ed25519-nkey`) for `subject`, with `nats` claims, signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value) -> String {
    let claims = serde_json::json!({
        "jti": format!("mailroom-test-{subject}"),
        "iat": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": "mailroom-test",
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        base64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        base64url(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", base64url(&signature))
}

/// An account JWT without limits, signed by `operator`; `jetstream` adds unlimited storage.
fn sign_account(operator: &nkeys::KeyPair, account: &nkeys::KeyPair, jetstream: bool) -> String {
    let mut limits = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for field in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[field] = serde_json::json!(-1);
        }
    }
    nats_jwt(
        operator,
        &account.public_key(),
        serde_json::json!({ "type": "account", "version": 2, "limits": limits }),
    )
}

#[test]
fn base64url_matches_the_rfc_4648_vectors() {
    let cases = [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
        ("foobar", "Zm9vYmFy"),
    ];
    for (plain, encoded) in cases {
        assert_eq!(base64url(plain.as_bytes()), encoded);
    }
    assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
}

/// Decentralised (operator mode) authentication: an operator, an account with JetStream, and a
/// user whose JWT and seed are in a `.creds` file, which is all the host is given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_file_authentication() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        serde_json::json!({ "type": "operator", "version": 2 }),
    );
    let account_jwt = sign_account(&operator, &account, true);
    let system_jwt = sign_account(&operator, &system, false);
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        serde_json::json!({ "type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1 }),
    );
    let server = NatsServer::start_with(ServerOptions {
        extra_config: format!(
            "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {acc}: \"{account_jwt}\"\n  {sys}: \"{system_jwt}\"\n}}\n",
            acc = account.public_key(),
            sys = system.public_key(),
        ),
        ..Default::default()
    })
    .unwrap();

    // Without credentials the server refuses the connection: the test is not passing by accident.
    assert!(
        async_nats::connect(server.url()).await.is_err(),
        "an anonymous client must not get in"
    );

    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("user.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    round_trip(
        &host_config(&format!("[nats]\ncredentials = \"{}\"\n", creds.display())),
        &server.url(),
    )
    .await;
}
