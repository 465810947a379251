//! The registry's NATS I/O: the `MR_REGISTRY` and `MR_REGISTRY_HOSTS` KV buckets and the
//! `MR_MODULES` Object Store.

use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, kv, object_store};
use futures::StreamExt as _;
use tokio::io::AsyncReadExt as _;

use super::{HostRecord, ModuleRef, SpecRecord, HISTORY, HOSTS, MODULES, SPECS};

/// How long a host record lives without being renewed.
pub const HOST_RECORD_TTL: Duration = Duration::from_secs(60);

/// The registry's buckets.
#[derive(Clone)]
pub struct Registry {
    /// Handler specs, a key per handler.
    pub specs: kv::Store,
    /// Host records, a key per host.
    pub hosts: kv::Store,
    /// Modules by content hash.
    pub modules: object_store::ObjectStore,
}

/// A handler's latest revision, with the KV revision to compare-and-set against.
#[derive(Debug, Clone)]
pub struct Latest {
    /// The record (`None` after a purge).
    pub record: Option<SpecRecord>,
    /// The key's last KV revision.
    pub kv_revision: u64,
}

impl Registry {
    /// Opens the buckets, creating the missing ones with `replicas`.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> anyhow::Result<Registry> {
        let specs = open_kv(
            js,
            kv::Config {
                bucket: SPECS.into(),
                description: "Mailroom: deployed handler specs, one key per handler".into(),
                history: HISTORY,
                num_replicas: replicas.max(1),
                ..Default::default()
            },
        )
        .await?;
        let hosts = open_kv(
            js,
            kv::Config {
                bucket: HOSTS.into(),
                description: "Mailroom: what each watching host runs".into(),
                history: 1,
                max_age: HOST_RECORD_TTL,
                num_replicas: replicas.max(1),
                ..Default::default()
            },
        )
        .await?;
        let modules = match js.get_object_store(MODULES).await {
            Ok(store) => store,
            Err(_) => match js
                .create_object_store(object_store::Config {
                    bucket: MODULES.into(),
                    description: Some("Mailroom: handler modules by SHA-256".into()),
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
            {
                Ok(store) => store,
                // Another client may have created it meanwhile.
                Err(err) => js.get_object_store(MODULES).await.map_err(|_| {
                    anyhow::anyhow!(
                        "cannot create the Object Store bucket {MODULES}: {err} (the account \
                         needs JetStream and permission to create streams)"
                    )
                })?,
            },
        };
        Ok(Registry {
            specs,
            hosts,
            modules,
        })
    }

    /// The latest revision of `name`, if it was ever deployed (and not purged since).
    pub async fn latest(&self, name: &str) -> anyhow::Result<Option<Latest>> {
        let entry =
            self.specs.entry(name).await.with_context(|| {
                format!("reading {name}'s spec from {SPECS} (is NATS reachable?)")
            })?;
        Ok(entry.map(|entry| Latest {
            record: match entry.operation {
                kv::Operation::Put => serde_json::from_slice(&entry.value).ok(),
                _ => None,
            },
            kv_revision: entry.revision,
        }))
    }

    /// Every revision of `name` still kept, oldest first.
    pub async fn history(&self, name: &str) -> anyhow::Result<Vec<SpecRecord>> {
        let mut history = self
            .specs
            .history(name)
            .await
            .with_context(|| format!("reading {name}'s history from {SPECS}"))?;
        let mut out = Vec::new();
        while let Some(entry) = history.next().await {
            let entry = entry.with_context(|| format!("reading {name}'s history"))?;
            match entry.operation {
                kv::Operation::Put => out.extend(serde_json::from_slice(&entry.value).ok()),
                // A purge drops what came before it.
                _ => out.clear(),
            }
        }
        Ok(out)
    }

    /// Writes `record` as the next revision of `name`, unless another write came after
    /// `last` (the KV revision it was decided against; `None`: the key must not exist).
    pub async fn write(
        &self,
        name: &str,
        record: &SpecRecord,
        last: Option<u64>,
    ) -> anyhow::Result<u64> {
        let value = serde_json::to_vec(record)?.into();
        let written = match last {
            Some(revision) => self
                .specs
                .update(name, value, revision)
                .await
                .map_err(anyhow::Error::from),
            None => self
                .specs
                .create(name, value)
                .await
                .map_err(anyhow::Error::from),
        };
        written.map_err(|err| {
            anyhow::anyhow!(
                "writing revision {} of {name} to {SPECS} failed: {err}. If another deploy of \
                 {name} happened at the same time, look at `mailroom history {name}` and run \
                 the command again",
                record.revision
            )
        })
    }

    /// The latest revision of every handler (purged ones left out).
    pub async fn all(&self) -> anyhow::Result<Vec<SpecRecord>> {
        let mut keys = match self.specs.keys().await {
            Ok(keys) => keys,
            Err(err) => bail!("listing {SPECS}: {err}"),
        };
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key.with_context(|| format!("listing {SPECS}"))?);
        }
        names.sort();
        let mut out = Vec::new();
        for name in names {
            if let Some(Latest {
                record: Some(record),
                ..
            }) = self.latest(&name).await?
            {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Stores `bytes` under their hash unless an object of that name is there already;
    /// returns the reference and whether it was uploaded.
    pub async fn upload(&self, bytes: &[u8]) -> anyhow::Result<(ModuleRef, bool)> {
        let module = ModuleRef::of(bytes);
        let name = module.object_name();
        if let Ok(info) = self.modules.info(&name).await {
            if !info.deleted && info.size as u64 == module.size {
                return Ok((module, false));
            }
        }
        let mut reader = bytes;
        let info = self
            .modules
            .put(name.as_str(), &mut reader)
            .await
            .with_context(|| format!("uploading module {name} to {MODULES}"))?;
        if info.size as u64 != module.size {
            bail!(
                "uploading module {name} to {MODULES}: the server stored {} bytes of {}",
                info.size,
                module.size
            );
        }
        Ok((module, true))
    }

    /// Whether the module is stored.
    pub async fn has_module(&self, module: &ModuleRef) -> bool {
        self.modules
            .info(module.object_name())
            .await
            .is_ok_and(|info| !info.deleted)
    }

    /// Downloads `module` and checks that its bytes hash to its name: a half-written or
    /// replaced object is refused, never returned.
    pub async fn download(&self, module: &ModuleRef) -> anyhow::Result<Vec<u8>> {
        let name = module.object_name();
        let mut object = self
            .modules
            .get(&name)
            .await
            .with_context(|| format!("downloading module {name} from {MODULES}"))?;
        let mut bytes = Vec::with_capacity(module.size as usize);
        object
            .read_to_end(&mut bytes)
            .await
            .with_context(|| format!("downloading module {name} from {MODULES}"))?;
        let actual = super::sha256_hex(&bytes);
        if actual != module.sha256 {
            bail!(
                "module {name} from {MODULES} is corrupt: its {} bytes hash to sha256 {actual}; \
                 it was not used. Deploy the module again to replace the object",
                bytes.len()
            );
        }
        Ok(bytes)
    }

    /// Every live host record, by host id.
    pub async fn host_records(&self) -> anyhow::Result<Vec<(String, HostRecord)>> {
        let mut keys = match self.hosts.keys().await {
            Ok(keys) => keys,
            Err(err) => bail!("listing {HOSTS}: {err}"),
        };
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.with_context(|| format!("listing {HOSTS}"))?;
            if let Ok(Some(value)) = self.hosts.get(&key).await {
                if let Ok(record) = serde_json::from_slice(&value) {
                    out.push((key, record));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Writes this host's record.
    pub async fn put_host(&self, id: &str, record: &HostRecord) -> anyhow::Result<()> {
        let value = serde_json::to_vec(record)?;
        self.hosts
            .put(id, value.into())
            .await
            .with_context(|| format!("writing host record {id} to {HOSTS}"))?;
        Ok(())
    }

    /// Removes this host's record (it stops).
    pub async fn delete_host(&self, id: &str) {
        let _ = self.hosts.purge(id).await;
    }
}

async fn open_kv(js: &jetstream::Context, config: kv::Config) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    let bucket = config.bucket.clone();
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(err) => js.get_key_value(&bucket).await.map_err(|_| {
            anyhow::anyhow!(
                "cannot create the KV bucket {bucket}: {err} (the account needs JetStream and \
                 permission to create streams)"
            )
        }),
    }
}
