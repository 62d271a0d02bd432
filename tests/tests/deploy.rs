//! The Kubernetes manifests in deploy/k8s agree with the binaries: the services' settings parse
//! as the services parse them (names and values), the files they name are mounted from
//! ConfigMaps and Secrets that hold them, the ConfigMaps' limits and queues files load, probes,
//! Services and PodDisruptionBudgets match the pods and their ports, the example worker finds
//! the queue's Service, and pods get longer to stop than the shutdown grace or drain timeout.
//! (YAML is read by Python's PyYAML in the tests' venv.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use serde_json::Value;

fn k8s_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// Every document of every YAML file in deploy/k8s, by file name.
fn manifests() -> anyhow::Result<BTreeMap<String, Vec<Value>>> {
    let script = "import json, sys, yaml\n\
        print(json.dumps({p: list(yaml.safe_load_all(open(p))) for p in sys.argv[1:]}))";
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in [k8s_dir(), k8s_dir().join("examples")] {
        for entry in std::fs::read_dir(dir)? {
            files.push(entry?.path());
        }
    }
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    let output = std::process::Command::new(sluice_testkit::python()?)
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "reading the manifests: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let by_path: BTreeMap<String, Vec<Value>> = serde_json::from_slice(&output.stdout)?;
    Ok(by_path
        .into_iter()
        .map(|(path, docs)| {
            let name = Path::new(&path)
                .strip_prefix(k8s_dir())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or(path);
            (name, docs)
        })
        .collect())
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |v, key| v.get(*key))
        .and_then(Value::as_str)
}

fn list_at<'a>(value: &'a Value, path: &[&str]) -> &'a [Value] {
    path.iter()
        .try_fold(value, |v, key| v.get(*key))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Parses a service's settings as the binary would: `env` (the container's literal values; a
/// variable the binary does not read is an error) become the flags they stand for, then
/// `args`, through the service's own option parser.
fn parse_as(binary: &str, env: &BTreeMap<&str, Option<&str>>, args: &[&str]) -> anyhow::Result<()> {
    let command = match binary {
        "limiter-svc" => limiter_svc::Config::command(),
        "queue-svc" => queue_svc::Config::command(),
        other => anyhow::bail!("no options known for {other}"),
    };
    let mut argv = vec![binary.to_owned()];
    for (var, value) in env.iter().filter(|(var, _)| var.starts_with("SLUICE_")) {
        let long = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == *var))
            .and_then(|a| a.get_long())
            .ok_or_else(|| anyhow::anyhow!("{binary} reads no {var}"))?;
        // A value from a Secret is not known here; a placeholder stands for it.
        argv.push(format!(
            "--{long}={}",
            value.unwrap_or("redis://secret:6379")
        ));
    }
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    match binary {
        "limiter-svc" => limiter_svc::Config::from_args(argv).map(drop),
        _ => queue_svc::Config::from_args(argv).map(drop),
    }
    .map_err(|e| anyhow::anyhow!("{binary}: {e}"))
}

/// The port of a `host:port` address.
fn port_of(address: &str) -> Option<u64> {
    address.rsplit_once(':')?.1.parse().ok()
}

#[test]
fn kubernetes_manifests_agree_with_the_binaries() -> anyhow::Result<()> {
    let files = manifests()?;
    let all: Vec<&Value> = files.values().flatten().collect();
    let of_kind = |kind: &str| -> Vec<&Value> {
        all.iter()
            .copied()
            .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind))
            .collect()
    };

    // Kustomize applies every manifest file.
    let kustomization = of_kind("Kustomization");
    let listed: BTreeSet<&str> = kustomization
        .iter()
        .flat_map(|k| list_at(k, &["resources"]))
        .filter_map(Value::as_str)
        .collect();
    let present: BTreeSet<&str> = files
        .keys()
        .map(String::as_str)
        .filter(|f| *f != "kustomization.yaml")
        .collect();
    let applied: BTreeSet<&str> = present
        .iter()
        .copied()
        .filter(|f| !f.starts_with("examples/"))
        .collect();
    anyhow::ensure!(
        listed == applied,
        "kustomization lists {listed:?}, the directory holds {applied:?}"
    );

    let config_maps: BTreeMap<&str, &Value> = of_kind("ConfigMap")
        .into_iter()
        .filter_map(|c| Some((str_at(c, &["metadata", "name"])?, c)))
        .collect();
    let services = of_kind("Service");
    let deployments = of_kind("Deployment");
    for budget in of_kind("PodDisruptionBudget") {
        let selector = budget.pointer("/spec/selector/matchLabels");
        anyhow::ensure!(
            deployments
                .iter()
                .any(|d| d.pointer("/spec/template/metadata/labels") == selector),
            "PodDisruptionBudget {:?} selects pods of a Deployment",
            str_at(budget, &["metadata", "name"])
        );
    }
    let mut checked = BTreeSet::new();
    for deployment in deployments {
        let name = str_at(deployment, &["metadata", "name"]).unwrap_or("?");
        let pod = deployment
            .pointer("/spec/template/spec")
            .ok_or_else(|| anyhow::anyhow!("{name}: no pod spec"))?;
        let labels = deployment.pointer("/spec/template/metadata/labels");
        let selector = deployment.pointer("/spec/selector/matchLabels");
        anyhow::ensure!(labels == selector, "{name}: the selector matches the pods");
        for container in list_at(pod, &["containers"]) {
            let binary = list_at(container, &["command"])
                .first()
                .and_then(Value::as_str)
                .unwrap_or("");
            let env: BTreeMap<&str, Option<&str>> = list_at(container, &["env"])
                .iter()
                .filter_map(|e| Some((str_at(e, &["name"])?, str_at(e, &["value"]))))
                .collect();
            let ports: BTreeMap<&str, u64> = list_at(container, &["ports"])
                .iter()
                .filter_map(|p| Some((str_at(p, &["name"])?, p.get("containerPort")?.as_u64()?)))
                .collect();
            if binary == "sluice-worker" {
                // It reaches the queue through a Service of these manifests.
                let url = env
                    .get("SLUICE_QUEUE_URL")
                    .copied()
                    .flatten()
                    .ok_or_else(|| anyhow::anyhow!("{name}: SLUICE_QUEUE_URL"))?;
                let (host, port) = url
                    .trim_start_matches("http://")
                    .split_once(':')
                    .ok_or_else(|| anyhow::anyhow!("{name}: {url}"))?;
                let found = services.iter().any(|s| {
                    str_at(s, &["metadata", "name"]) == Some(host)
                        && list_at(s, &["spec", "ports"])
                            .iter()
                            .any(|p| p.get("port").and_then(Value::as_u64) == port.parse().ok())
                });
                anyhow::ensure!(found, "{name}: {url} names a Service of the manifests");
                let args: Vec<&str> = list_at(container, &["args"])
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                let drain = args
                    .iter()
                    .position(|a| *a == "--drain-timeout")
                    .and_then(|i| args.get(i + 1))
                    .map_or(Ok(std::time::Duration::from_secs(30)), |d| {
                        sluice::config::parse_duration(d)
                    })
                    .map_err(anyhow::Error::msg)?;
                let kill = pod
                    .get("terminationGracePeriodSeconds")
                    .and_then(Value::as_u64)
                    .unwrap_or(30);
                anyhow::ensure!(
                    kill > drain.as_secs(),
                    "{name}: {kill} s to stop, drain {drain:?}"
                );
                checked.insert(binary);
                continue;
            }
            let args: Vec<&str> = list_at(container, &["args"])
                .iter()
                .filter_map(Value::as_str)
                .collect();
            parse_as(binary, &env, &args).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let metrics = env
                .get("SLUICE_METRICS_LISTEN")
                .copied()
                .flatten()
                .and_then(port_of);
            anyhow::ensure!(
                metrics.is_some() && metrics == ports.get("metrics").copied(),
                "{name}: the metrics port is the one listened on"
            );

            // The gRPC port: listened on, probed, and what the Services point at.
            let grpc = *ports
                .get("grpc")
                .ok_or_else(|| anyhow::anyhow!("{name}: a port named grpc"))?;
            let listen = env.get("SLUICE_LISTEN").copied().flatten().unwrap_or("");
            anyhow::ensure!(
                listen.ends_with(&format!(":{grpc}")),
                "{name}: listens on {grpc}"
            );
            for probe in ["readinessProbe", "livenessProbe"] {
                let port = container.pointer(&format!("/{probe}/grpc/port"));
                anyhow::ensure!(
                    port.and_then(Value::as_u64) == Some(grpc),
                    "{name}: {probe}"
                );
            }
            let service = services
                .iter()
                .find(|s| s.pointer("/spec/selector") == labels)
                .ok_or_else(|| anyhow::anyhow!("{name}: a Service selects its pods"))?;
            for port in list_at(service, &["spec", "ports"]) {
                let target = str_at(port, &["targetPort"]).unwrap_or("");
                anyhow::ensure!(
                    ports.contains_key(target),
                    "{name}: Service targets {target}"
                );
            }

            // Pods outlast the shutdown grace.
            let grace = env
                .get("SLUICE_SHUTDOWN_GRACE")
                .copied()
                .flatten()
                .unwrap_or("10s");
            let grace = sluice::config::parse_duration(grace).map_err(anyhow::Error::msg)?;
            let kill = pod
                .get("terminationGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30);
            anyhow::ensure!(
                kill > grace.as_secs(),
                "{name}: {kill} s to stop, grace {grace:?}"
            );

            // Every file an option names is mounted, and the ConfigMaps' files load.
            for (var, path) in env.iter().filter_map(|(k, v)| Some((k, (*v)?))) {
                if !path.starts_with("/etc/sluice/") {
                    continue;
                }
                let path = Path::new(path);
                let (dir, file) = (
                    path.parent().map(|d| d.to_string_lossy().into_owned()),
                    path.file_name().map(|f| f.to_string_lossy().into_owned()),
                );
                let (Some(dir), Some(file)) = (dir, file) else {
                    anyhow::bail!("{name}: {var} is not a file path");
                };
                let mount = list_at(container, &["volumeMounts"])
                    .iter()
                    .find(|m| str_at(m, &["mountPath"]) == Some(dir.as_str()))
                    .and_then(|m| str_at(m, &["name"]))
                    .ok_or_else(|| anyhow::anyhow!("{name}: {var}: nothing mounted at {dir}"))?;
                let volume = list_at(pod, &["volumes"])
                    .iter()
                    .find(|v| str_at(v, &["name"]) == Some(mount))
                    .ok_or_else(|| anyhow::anyhow!("{name}: no volume {mount}"))?;
                if let Some(map) = str_at(volume, &["configMap", "name"]) {
                    let text = config_maps
                        .get(map)
                        .and_then(|c| str_at(c, &["data", file.as_str()]))
                        .ok_or_else(|| anyhow::anyhow!("{name}: ConfigMap {map} has no {file}"))?;
                    match *var {
                        "SLUICE_LIMITS" => {
                            limiter_svc::policy::Policies::parse(text)
                                .map_err(|e| anyhow::anyhow!("{map}/{file}: {e}"))?;
                        }
                        "SLUICE_QUEUES" => {
                            queue_svc::queues::Queues::parse(text)
                                .map_err(|e| anyhow::anyhow!("{map}/{file}: {e}"))?;
                        }
                        other => anyhow::bail!("{name}: no check for the file of {other}"),
                    }
                } else {
                    let items = list_at(volume, &["secret", "items"]);
                    anyhow::ensure!(
                        volume.get("secret").is_some()
                            && (items.is_empty()
                                || items.iter().any(|i| str_at(i, &["path"]) == Some(&file))),
                        "{name}: volume {mount} provides {file}"
                    );
                }
            }
            checked.insert(binary);
        }
    }
    anyhow::ensure!(
        checked == BTreeSet::from(["limiter-svc", "queue-svc", "sluice-worker"]),
        "every binary has a manifest: {checked:?}"
    );
    Ok(())
}
