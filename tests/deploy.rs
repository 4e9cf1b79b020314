//! deploy/ checked offline: every YAML and JSON file parses; the Kubernetes objects (the
//! kustomize base, and each overlay rendered by a small strategic-merge renderer below) agree
//! with each other and with the gateway's real configuration, ports and admin paths; the
//! Dockerfiles are checked statically (no `docker build` here) and the command they run is run;
//! the compose stack's files are wired to each other; and every `tripwire_*` metric the Grafana
//! dashboard and the Prometheus rules name is exported by a live gateway after traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_yaml_ng::Value;
use tripwire::config::Config;

use crate::util::process::KillOnDrop;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn tripwire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tripwire"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file (`---`-separated).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn yaml(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

/// `value` at a dotted path (`spec.template.spec`); numbers index sequences.
fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    let mut v = value;
    for key in path.split('.') {
        v = match key.parse::<usize>() {
            Ok(i) if v.is_sequence() => &v[i],
            _ => &v[key],
        };
    }
    v
}

fn s<'a>(value: &'a Value, path: &str) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {value:?}"))
}

fn seq<'a>(value: &'a Value, path: &str) -> &'a [Value] {
    at(value, path).as_sequence().map_or(&[], |s| s.as_slice())
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
    out.sort();
}

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut files = Vec::new();
    files_under(&deploy(), &mut files);
    let mut parsed = 0;
    for file in &files {
        match file.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                assert!(!yaml_docs(file).is_empty(), "{} is empty", file.display());
                parsed += 1;
            }
            Some("json") => {
                serde_json::from_str::<serde_json::Value>(&read(file))
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                parsed += 1;
            }
            _ => {}
        }
    }
    assert!(parsed >= 20, "only {parsed} YAML/JSON files under deploy/");
}

// ---- Kubernetes ----

/// Renders a kustomization the way `kustomize build` does for the features deploy/ uses:
/// `resources` (files and directories), `patches` (strategic merge by kind and name, lists of
/// named items merged by name) and `images`. Any other field fails the test, so a new feature
/// gets a renderer here before it is relied on.
fn kustomize(dir: &Path) -> Vec<Value> {
    let k = yaml(&dir.join("kustomization.yaml"));
    assert_eq!(
        s(&k, "apiVersion"),
        "kustomize.config.k8s.io/v1beta1",
        "{}",
        dir.display()
    );
    assert_eq!(s(&k, "kind"), "Kustomization");
    for key in k.as_mapping().unwrap().keys() {
        let key = key.as_str().unwrap();
        assert!(
            ["apiVersion", "kind", "resources", "patches", "images"].contains(&key),
            "{}: `{key}` is not supported by the offline renderer in tests/deploy.rs",
            dir.display()
        );
    }
    let mut objects = Vec::new();
    for resource in seq(&k, "resources") {
        let path = dir.join(resource.as_str().unwrap());
        assert!(
            path.exists(),
            "{}: resource {path:?} missing",
            dir.display()
        );
        if path.is_dir() {
            objects.extend(kustomize(&path));
        } else {
            objects.extend(yaml_docs(&path));
        }
    }
    for patch in seq(&k, "patches") {
        let path = dir.join(s(patch, "path"));
        for doc in yaml_docs(&path) {
            let target = objects
                .iter_mut()
                .find(|o| {
                    o["kind"] == doc["kind"] && o["metadata"]["name"] == doc["metadata"]["name"]
                })
                .unwrap_or_else(|| panic!("{}: patch target not in the resources", path.display()));
            merge(target, &doc);
        }
    }
    for image in seq(&k, "images") {
        let name = s(image, "name");
        let new_name = image["newName"].as_str().unwrap_or(name);
        let new = match image["newTag"].as_str() {
            Some(tag) => format!("{new_name}:{tag}"),
            None => new_name.to_owned(),
        };
        let mut used = false;
        for object in &mut objects {
            if let Some(containers) =
                object["spec"]["template"]["spec"]["containers"].as_sequence_mut()
            {
                for c in containers {
                    let current = c["image"].as_str().unwrap_or("");
                    let current_name = current.rsplit_once(':').map_or(current, |(n, _)| n);
                    if current_name == name {
                        c["image"] = Value::from(new.clone());
                        used = true;
                    }
                }
            }
        }
        assert!(
            used,
            "{}: image {name} is used by no container",
            dir.display()
        );
    }
    objects
}

/// Strategic merge: maps merge key by key, lists whose items all have a `name` merge by name,
/// everything else is replaced.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Mapping(b), Value::Mapping(p)) => {
            for (key, value) in p {
                match b.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        b.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Sequence(b), Value::Sequence(p))
            if b.iter().chain(p).all(|item| item["name"].is_string()) =>
        {
            for item in p {
                match b.iter_mut().find(|x| x["name"] == item["name"]) {
                    Some(existing) => merge(existing, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_mapping().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn duration_secs(text: &str) -> f64 {
    humantime::parse_duration(text).unwrap().as_secs_f64()
}

/// A file inside a container, found through the pod's ConfigMap volumes: the ConfigMap keys
/// mounted under `dir` (a file or a directory), with their text.
fn configmap_files(
    objects: &[Value],
    pod: &Value,
    mounts: &[Value],
    dir: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for mount in mounts {
        let mount_path = s(mount, "mountPath").trim_end_matches('/');
        let volume = seq(pod, "volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        if volume["configMap"].is_null() {
            continue;
        }
        let name = s(volume, "configMap.name");
        let configmap = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("ConfigMap {name} mounted but not defined"));
        for item in seq(volume, "configMap.items") {
            let file = format!("{mount_path}/{}", s(item, "path"));
            if file == dir || file.starts_with(&format!("{dir}/")) {
                let key = s(item, "key");
                let text = configmap["data"][key]
                    .as_str()
                    .unwrap_or_else(|| panic!("ConfigMap {name} has no key {key}"));
                out.push((file, text.to_owned()));
            }
        }
    }
    out
}

/// The checks every rendered set of objects must pass; returns the gateway config it mounts.
fn check_kubernetes(objects: &[Value], what: &str) -> Config {
    let known: BTreeSet<(&str, &str)> = [
        ("v1", "ServiceAccount"),
        ("v1", "ConfigMap"),
        ("v1", "Service"),
        ("apps/v1", "Deployment"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("policy/v1", "PodDisruptionBudget"),
    ]
    .into();
    for o in objects {
        let pair = (s(o, "apiVersion"), s(o, "kind"));
        assert!(
            known.contains(&pair),
            "{what}: unexpected apiVersion/kind {pair:?}"
        );
        let name = s(o, "metadata.name");
        assert!(
            !name.is_empty()
                && name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{what}: bad name {name:?}"
        );
    }
    let deployments = find(objects, "Deployment");
    assert_eq!(deployments.len(), 1, "{what}: one Deployment");
    let deployment = deployments[0];
    let template = at(deployment, "spec.template");
    let pod = at(template, "spec");
    let labels = at(template, "metadata.labels");
    assert!(
        labels_match(at(deployment, "spec.selector.matchLabels"), labels),
        "{what}: Deployment selector does not match its template labels"
    );
    let containers = seq(pod, "containers");
    assert_eq!(containers.len(), 1, "{what}: one container");
    let c = &containers[0];

    // The configuration the container reads: its --config argument, resolved through the
    // ConfigMap volume, parsed and validated by the gateway's own code.
    let args: Vec<&str> = seq(c, "args").iter().map(|a| a.as_str().unwrap()).collect();
    assert!(
        args.contains(&"serve"),
        "{what}: the container does not run `serve`: {args:?}"
    );
    let config_path = args
        .iter()
        .skip_while(|a| **a != "--config")
        .nth(1)
        .unwrap_or_else(|| panic!("{what}: no --config in {args:?}"));
    let mounts = seq(c, "volumeMounts");
    let files = configmap_files(objects, pod, mounts, config_path);
    assert_eq!(
        files.len(),
        1,
        "{what}: {config_path} is not a ConfigMap key"
    );
    let config = Config::parse(&files[0].1, Path::new(config_path))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    config.validate().unwrap();
    if let Some(policies) = &config.policies {
        let policies = policies.to_str().unwrap();
        let files = configmap_files(objects, pod, mounts, policies);
        assert!(!files.is_empty(), "{what}: policies {policies} not mounted");
        for (file, text) in files {
            tripwire::policy::compile_text(&text, &file).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
    assert!(
        config.listen.ip().is_unspecified(),
        "{what}: proxy must listen on 0.0.0.0"
    );
    assert!(
        config.admin_listen.ip().is_unspecified(),
        "{what}: admin must listen on 0.0.0.0"
    );

    // Ports: named, and the numbers the config listens on.
    let ports: BTreeMap<&str, u64> = seq(c, "ports")
        .iter()
        .map(|p| (s(p, "name"), at(p, "containerPort").as_u64().unwrap()))
        .collect();
    assert_eq!(
        ports.get("proxy"),
        Some(&u64::from(config.listen.port())),
        "{what}"
    );
    assert_eq!(
        ports.get("admin"),
        Some(&u64::from(config.admin_listen.port())),
        "{what}"
    );

    // Probes on the admin listener's real paths.
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{what}: {probe}");
        assert_eq!(
            get["port"], "admin",
            "{what}: {probe} must use the admin port"
        );
    }
    let annotations = at(template, "metadata.annotations");
    assert_eq!(annotations["prometheus.io/scrape"], "true", "{what}");
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(config.admin_listen.port().to_string().as_str()),
        "{what}"
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics", "{what}");

    // Image: pinned, never latest.
    let image = s(c, "image");
    let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
    assert!(
        !tag.is_empty() && tag != "latest" && !tag.contains('/'),
        "{what}: image {image} not pinned"
    );

    // Resources.
    for key in ["requests.cpu", "requests.memory", "limits.memory"] {
        assert!(
            !at(&c["resources"], key).is_null(),
            "{what}: resources.{key} unset"
        );
    }

    // Non-root, read-only root, and a writable volume where the store lives.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
    assert!(
        at(pod, "securityContext.runAsUser").as_u64().unwrap() > 0,
        "{what}"
    );
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"], true,
        "{what}"
    );
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"], false,
        "{what}"
    );
    let volumes = seq(pod, "volumes");
    for mount in mounts {
        assert!(
            volumes.iter().any(|v| v["name"] == mount["name"]),
            "{what}: volumeMount {:?} has no volume",
            mount["name"]
        );
    }
    let store_dir = config
        .store
        .path
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let store_mount = mounts
        .iter()
        .find(|m| s(m, "mountPath") == store_dir)
        .unwrap_or_else(|| panic!("{what}: nothing writable mounted at {store_dir}"));
    let store_volume = volumes
        .iter()
        .find(|v| v["name"] == store_mount["name"])
        .unwrap();
    assert!(
        !store_volume["emptyDir"].is_null() || !store_volume["persistentVolumeClaim"].is_null(),
        "{what}: the store needs an emptyDir or a PVC"
    );
    assert_ne!(store_mount["readOnly"], true, "{what}");

    // Shutdown: the grace period covers the preStop pause and the gateway's drain.
    let grace = at(pod, "terminationGracePeriodSeconds").as_f64().unwrap();
    let pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        grace > pause + config.shutdown_grace.as_secs_f64(),
        "{what}: terminationGracePeriodSeconds {grace} <= preStop {pause} + shutdown_grace"
    );

    // The admin token comes from a Secret, never from a literal.
    let env = seq(c, "env");
    let token = env
        .iter()
        .find(|e| e["name"] == "TRIPWIRE_ADMIN_TOKEN")
        .unwrap_or_else(|| panic!("{what}: no TRIPWIRE_ADMIN_TOKEN"));
    assert!(
        token["value"].is_null() && !token["valueFrom"]["secretKeyRef"].is_null(),
        "{what}"
    );

    // Services select the pods and target real container ports.
    let services = find(objects, "Service");
    assert!(!services.is_empty(), "{what}: no Service");
    for service in services {
        assert!(
            labels_match(at(service, "spec.selector"), labels),
            "{what}: Service selector"
        );
        for port in seq(service, "spec.ports") {
            let target = &port["targetPort"];
            let ok = match target {
                Value::String(name) => ports.contains_key(name.as_str()),
                Value::Number(n) => ports.values().any(|p| Some(*p) == n.as_u64()),
                _ => false,
            };
            assert!(
                ok,
                "{what}: Service targetPort {target:?} is no container port"
            );
        }
    }

    // The autoscaler scales this Deployment on a resource the container requests.
    let hpas = find(objects, "HorizontalPodAutoscaler");
    assert_eq!(hpas.len(), 1, "{what}");
    let hpa = hpas[0];
    assert_eq!(at(hpa, "spec.scaleTargetRef.kind"), "Deployment");
    assert_eq!(at(hpa, "spec.scaleTargetRef.apiVersion"), "apps/v1");
    assert_eq!(
        at(hpa, "spec.scaleTargetRef.name"),
        at(deployment, "metadata.name")
    );
    let min = at(hpa, "spec.minReplicas").as_u64().unwrap();
    let max = at(hpa, "spec.maxReplicas").as_u64().unwrap();
    assert!(min >= 1 && min <= max, "{what}: replicas {min}..{max}");
    for metric in seq(hpa, "spec.metrics") {
        if metric["type"] == "Resource" {
            let resource = s(metric, "resource.name");
            assert!(
                !c["resources"]["requests"][resource].is_null(),
                "{what}: HPA scales on {resource}, which the container does not request"
            );
        }
    }

    // The disruption budget selects the pods and never blocks a drain.
    for pdb in find(objects, "PodDisruptionBudget") {
        assert!(
            labels_match(at(pdb, "spec.selector.matchLabels"), labels),
            "{what}: PDB selector"
        );
        if let Some(min_available) = at(pdb, "spec.minAvailable").as_u64() {
            assert!(
                min_available < min,
                "{what}: minAvailable {min_available} blocks drains at {min} replicas"
            );
        }
    }
    config
}

#[test]
fn kubernetes_base_is_consistent_with_the_gateway() {
    let objects = kustomize(&deploy().join("kubernetes/base"));
    let config = check_kubernetes(&objects, "base");
    assert_eq!(config.inference.device, tripwire::infer::Device::Cpu);
    // The policy copy in the ConfigMap is the repository's default policy.
    let configmap = find(&objects, "ConfigMap")[0];
    assert_eq!(
        configmap["data"]["policy-default.yaml"].as_str(),
        Some(read(&root().join("policies/default.yaml")).as_str()),
        "deploy/kubernetes/base/configmap.yaml: policy-default.yaml differs from policies/default.yaml; copy it over"
    );
    let image = s(
        &find(&objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0],
        "image",
    );
    assert!(image.ends_with(":0.1.0"), "{image}");
}

#[test]
fn kubernetes_gpu_overlay_renders_and_stays_consistent() {
    let objects = kustomize(&deploy().join("kubernetes/overlays/gpu"));
    let config = check_kubernetes(&objects, "gpu overlay");
    assert_eq!(config.inference.device, tripwire::infer::Device::Cuda);
    let c = &find(&objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    // The patch merged into the base container instead of replacing it.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(s(c, "image").ends_with("-cuda"), "{:?}", c["image"]);
}

#[test]
fn the_offline_renderer_merges_named_lists_and_refuses_unknown_features() {
    let mut base: Value = serde_yaml_ng::from_str(
        "spec: {containers: [{name: a, image: x, ports: [{name: p, containerPort: 1}]}, {name: b, image: y}]}",
    )
    .unwrap();
    let patch: Value =
        serde_yaml_ng::from_str("spec: {containers: [{name: a, image: z}, {name: c, image: w}]}")
            .unwrap();
    merge(&mut base, &patch);
    let names: Vec<&str> = seq(&base, "spec.containers")
        .iter()
        .map(|c| s(c, "name"))
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(s(&base, "spec.containers.0.image"), "z");
    assert_eq!(
        at(&base, "spec.containers.0.ports.0.containerPort").as_u64(),
        Some(1)
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamePrefix: x-\n",
    )
    .unwrap();
    let refused = std::panic::catch_unwind(|| kustomize(dir.path()));
    assert!(refused.is_err(), "namePrefix must not be silently ignored");
}

// ---- Dockerfiles ----

/// One Dockerfile instruction: keyword (upper case) and its arguments, continuations joined.
fn dockerfile(path: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in read(path).lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let (keyword, args) = pending.split_once(' ').unwrap_or((&pending, ""));
        out.push((keyword.to_uppercase(), args.trim().to_owned()));
        pending.clear();
    }
    out
}

/// The arguments of an exec-form instruction (`["a", "b"]`).
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not exec form ({e}): {args}"))
}

/// Whether `path` (relative to the context) is excluded by a .dockerignore's patterns:
/// `*` within one path segment, a leading `**/`, `!` re-includes; the last match wins.
fn ignored(patterns: &str, path: &str) -> bool {
    fn glob(pattern: &[u8], text: &[u8]) -> bool {
        match (pattern.first(), text.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                glob(&pattern[1..], text)
                    || (text.first().is_some_and(|c| *c != b'/') && glob(pattern, &text[1..]))
            }
            (Some(p), Some(t)) if p == t => glob(&pattern[1..], &text[1..]),
            _ => false,
        }
    }
    let mut excluded = false;
    for line in patterns.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (include, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pattern = pattern.trim_end_matches('/');
        let matches = |p: &str| {
            // A pattern matches the path itself or any directory above it.
            let mut prefix = String::new();
            path.split('/').any(|segment| {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(segment);
                glob(p.as_bytes(), prefix.as_bytes())
            })
        };
        let hit = match pattern.strip_prefix("**/") {
            Some(rest) => {
                path.split('/')
                    .any(|seg| glob(rest.as_bytes(), seg.as_bytes()))
                    || matches(rest)
            }
            None => matches(pattern),
        };
        if hit {
            excluded = !include;
        }
    }
    excluded
}

struct Image {
    /// `ENV` of the final stage.
    env: BTreeMap<String, String>,
    /// Repository file for each in-image path a context `COPY` writes.
    copies: BTreeMap<String, PathBuf>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
    exposed: BTreeSet<u16>,
}

/// Checks one Dockerfile statically and returns what its final stage runs.
fn check_dockerfile(name: &str, ignore_file: &Path) -> Image {
    let path = deploy().join(name);
    let instructions = dockerfile(&path);
    let ignore = read(ignore_file);
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, a)| a)
        .collect();
    assert!(froms.len() >= 2, "{name}: not multi-stage");
    let mut stages = Vec::new();
    for from in &froms {
        let mut parts = from.split_whitespace().filter(|p| !p.starts_with("--"));
        let image = parts.next().unwrap();
        if !stages.contains(&image) {
            let (_, tag) = image
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("{name}: {image} has no tag"));
            assert!(
                tag != "latest" && !tag.contains('/'),
                "{name}: {image} is not pinned"
            );
        }
        if let (Some("AS" | "as"), Some(stage)) = (parts.next(), parts.next()) {
            stages.push(stage);
        }
    }
    let last_from = instructions.iter().rposition(|(k, _)| k == "FROM").unwrap();
    let mut image = Image {
        env: BTreeMap::new(),
        copies: BTreeMap::new(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        healthcheck: Vec::new(),
        exposed: BTreeSet::new(),
    };
    let mut user = None;
    for (i, (keyword, args)) in instructions.iter().enumerate() {
        if keyword == "COPY" && !args.contains("--from=") {
            let parts: Vec<&str> = args
                .split_whitespace()
                .filter(|p| !p.starts_with("--"))
                .collect();
            let (dest, sources) = parts.split_last().unwrap();
            for source in sources {
                let source = source.trim_end_matches('/');
                if source != "." {
                    assert!(
                        root().join(source).exists(),
                        "{name}: COPY source {source} missing"
                    );
                    assert!(
                        !ignored(&ignore, source),
                        "{name}: COPY source {source} is excluded by {}",
                        ignore_file.display()
                    );
                }
                if i > last_from {
                    image.copies.insert((*dest).to_owned(), root().join(source));
                }
            }
        }
        if i <= last_from {
            continue;
        }
        match keyword.as_str() {
            "USER" => user = Some(args.clone()),
            "ENTRYPOINT" => image.entrypoint = exec_form(args),
            "CMD" => image.cmd = exec_form(args),
            "EXPOSE" => image
                .exposed
                .extend(args.split_whitespace().map(|p| p.parse::<u16>().unwrap())),
            "HEALTHCHECK" => {
                let (_, command) = args
                    .split_once("CMD ")
                    .unwrap_or_else(|| panic!("{name}: HEALTHCHECK without CMD"));
                image.healthcheck = exec_form(command.trim());
            }
            "ENV" => {
                for pair in args.split_whitespace() {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("{name}: ENV {pair} not KEY=VALUE"));
                    image.env.insert(k.to_owned(), v.to_owned());
                }
            }
            _ => {}
        }
    }
    let user = user.unwrap_or_else(|| panic!("{name}: the final stage has no USER"));
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name}: USER {user} is not numeric"));
    assert!(uid > 0, "{name}: USER root");
    assert!(!image.healthcheck.is_empty(), "{name}: no HEALTHCHECK");
    assert_eq!(image.entrypoint, ["/usr/local/bin/tripwire"], "{name}");
    assert_eq!(
        image.healthcheck.first().map(String::as_str),
        Some("/usr/local/bin/tripwire"),
        "{name}"
    );
    assert_eq!(
        image.copies.get("/usr/local/bin/tripwire"),
        None,
        "{name}: the binary must come from the build stage"
    );
    // The baked configuration: parsed by the gateway, its ports the exposed ones.
    let config_path = image
        .env
        .get("TRIPWIRE_CONFIG")
        .unwrap_or_else(|| panic!("{name}: no TRIPWIRE_CONFIG"));
    let file = image
        .copies
        .get(config_path)
        .unwrap_or_else(|| panic!("{name}: {config_path} is not copied in"));
    let config = Config::load(file).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        config.listen.ip().is_unspecified() && config.admin_listen.ip().is_unspecified(),
        "{name}"
    );
    assert_eq!(
        image.exposed,
        BTreeSet::from([config.listen.port(), config.admin_listen.port()]),
        "{name}"
    );
    let health_url = image
        .healthcheck
        .iter()
        .skip_while(|a| *a != "--url")
        .nth(1)
        .unwrap();
    assert_eq!(
        health_url,
        &format!("http://127.0.0.1:{}/healthz", config.admin_listen.port()),
        "{name}"
    );
    // The commands are real subcommands and flags of this binary.
    for command in [image.cmd.clone(), image.healthcheck[1..].to_vec()] {
        let out = tripwire().args(&command).arg("--help").output().unwrap();
        assert!(
            out.status.success(),
            "{name}: `tripwire {command:?} --help` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    image
}

#[test]
fn dockerfiles_are_multi_stage_non_root_pinned_and_run_real_commands() {
    let cpu = check_dockerfile("Dockerfile", &root().join(".dockerignore"));
    assert_eq!(cpu.cmd, ["--log-json", "serve"]);
    let cuda = check_dockerfile(
        "Dockerfile.cuda",
        &deploy().join("Dockerfile.cuda.dockerignore"),
    );
    let config = Config::load(&cuda.copies["/etc/tripwire/gateway.yaml"]).unwrap();
    assert_eq!(config.inference.device, tripwire::infer::Device::Cuda);
    let ort = &cuda.env["ORT_DYLIB_PATH"];
    assert!(
        ort.starts_with("/opt/tripwire/onnxruntime-gpu/libonnxruntime.so."),
        "{ort}"
    );
    // The CPU image's build stage copies the pinned files the manifest names.
    let manifest = read(&root().join("models/manifest.toml"));
    let dockerfile = read(&deploy().join("Dockerfile"));
    for file in [
        "libonnxruntime.so.1.32.0",
        "all-MiniLM-L6-v2-int8.onnx",
        "all-MiniLM-L6-v2-tokenizer.json",
        "vader_lexicon.txt",
    ] {
        assert!(
            manifest.contains(&format!("file = \"{file}\"")),
            "{file} not pinned in the manifest"
        );
        assert!(
            dockerfile.contains(&format!("models/{file}")),
            "deploy/Dockerfile does not ship {file}"
        );
    }
    // The export the CUDA image ships is let into its context; the CPU context keeps it out.
    let fp16 = "models/all-MiniLM-L6-v2-fp16.onnx";
    assert!(!ignored(
        &read(&deploy().join("Dockerfile.cuda.dockerignore")),
        fp16
    ));
    assert!(ignored(&read(&root().join(".dockerignore")), fp16));
    assert!(ignored(
        &read(&root().join(".dockerignore")),
        "target/release/tripwire"
    ));
    assert!(!ignored(
        &read(&root().join(".dockerignore")),
        "models/char-lm-en.bin"
    ));
}

#[test]
fn the_cuda_build_helper_checks_the_export_and_unpacks_the_gpu_library() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m-fp16.onnx");
    std::fs::write(&model, b"weights").unwrap();
    let stamp = dir.path().join("export.json");
    let wrong = "ad7a0ba4ed3e5f1d1a0bd0c3e0b0e8f3f3c1a1d3a4b9e69ec8d8d95d47c6a2bb";
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"weights"))
    };
    let helper = deploy().join("docker/models.py");
    let run = |args: &[&str]| {
        Command::new("python3")
            .arg(&helper)
            .args(args)
            .output()
            .unwrap()
    };
    for (recorded, ok) in [(sha.as_str(), true), (wrong, false)] {
        std::fs::write(
            &stamp,
            format!(r#"{{"fp16": {{"file": "m-fp16.onnx", "sha256": "{recorded}"}}}}"#),
        )
        .unwrap();
        let out = run(&["check-export", stamp.to_str().unwrap(), "fp16"]);
        assert_eq!(
            out.status.success(),
            ok,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A wheel without the CUDA provider is refused, naming the member.
    let wheels = dir.path().join("wheels");
    std::fs::create_dir(&wheels).unwrap();
    let script = "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w') as z:\n    for n in sys.argv[2:]:\n        z.writestr('onnxruntime/capi/' + n, n)\n";
    let wheel = wheels.join("onnxruntime_gpu-9.9.9-cp311-cp311-manylinux_2_28_x86_64.whl");
    let make = |members: &[&str]| {
        let status = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&wheel)
            .args(members)
            .status()
            .unwrap();
        assert!(status.success());
    };
    let out_dir = dir.path().join("out");
    let extract = || {
        run(&[
            "extract-ort-gpu",
            wheels.to_str().unwrap(),
            "9.9.9",
            out_dir.to_str().unwrap(),
        ])
    };
    make(&[
        "libonnxruntime.so.9.9.9",
        "libonnxruntime_providers_shared.so",
    ]);
    let out = extract();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("libonnxruntime_providers_cuda.so"));
    make(&[
        "libonnxruntime.so.9.9.9",
        "libonnxruntime_providers_shared.so",
        "libonnxruntime_providers_cuda.so",
    ]);
    let out = extract();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(out_dir.join("libonnxruntime_providers_cuda.so")).unwrap(),
        b"libonnxruntime_providers_cuda.so"
    );
}

// ---- docker-compose, Prometheus, Grafana, OTel Collector ----

#[test]
fn compose_stack_files_are_wired_to_each_other() {
    let compose = yaml(&deploy().join("docker-compose.yaml"));
    let services = at(&compose, "services").as_mapping().unwrap();
    for want in [
        "tripwire",
        "sim-upstream",
        "otel-collector",
        "prometheus",
        "grafana",
        "postgres",
    ] {
        assert!(services.contains_key(want), "compose: no {want} service");
    }
    // Every bind mount: source file exists, and where it lands inside the container.
    let mut mounted: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (name, service) in services {
        let image = s(service, "image");
        let (_, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{name:?}: {image} has no tag"));
        assert_ne!(tag, "latest", "{name:?}");
        if !service["build"].is_null() {
            let context = deploy().join(s(service, "build.context"));
            assert!(
                context.join(s(service, "build.dockerfile")).is_file(),
                "{name:?}"
            );
        }
        for volume in seq(service, "volumes") {
            let spec = volume.as_str().unwrap();
            let mut parts = spec.split(':');
            let (source, target) = (parts.next().unwrap(), parts.next().unwrap());
            if source.starts_with('.') {
                let path = deploy().join(source);
                assert!(path.exists(), "compose: {spec}: {} missing", path.display());
                mounted.insert(target.to_owned(), path);
            } else {
                assert!(
                    compose["volumes"].get(source).is_some(),
                    "{spec}: volume {source} not declared"
                );
            }
        }
    }
    let env = &compose["services"]["tripwire"]["environment"];
    assert!(s(env, "TRIPWIRE_UPSTREAM").contains("sim-upstream:8000"));
    assert!(s(env, "OTEL_EXPORTER_OTLP_ENDPOINT").contains("otel-collector:4318"));
    let sim_command: Vec<&str> = seq(&compose["services"]["sim-upstream"], "command")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let out = tripwire()
        .args(&sim_command)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compose sim-upstream command {sim_command:?} is not a tripwire command"
    );

    // Prometheus loads the rule file from where compose mounts it, and scrapes the admin port.
    let prometheus = yaml(&mounted["/etc/prometheus/prometheus.yaml"]);
    for rule_file in seq(&prometheus, "rule_files") {
        let rule_file = rule_file.as_str().unwrap();
        assert_eq!(
            mounted.get(rule_file),
            Some(&deploy().join("./prometheus/tripwire-alerts.yaml")),
            "{rule_file}"
        );
    }
    let jobs = seq(&prometheus, "scrape_configs");
    let tripwire_job = jobs.iter().find(|j| j["job_name"] == "tripwire").unwrap();
    let image_config = Config::load(&root().join("deploy/docker/gateway.yaml")).unwrap();
    assert_eq!(
        s(tripwire_job, "static_configs.0.targets.0"),
        format!("tripwire:{}", image_config.admin_listen.port())
    );
    let rules = read(&deploy().join("prometheus/tripwire-alerts.yaml"));
    assert!(
        rules.contains("up{job=\"tripwire\"}"),
        "the TripwireDown rule must use the scrape job's name"
    );

    // Grafana: the provider reads the directory the dashboard is mounted in; the dashboard's
    // datasource is the provisioned one.
    let provider = yaml(&mounted["/etc/grafana/provisioning/dashboards"].join("tripwire.yaml"));
    let dir = s(&provider, "providers.0.options.path");
    assert!(
        mounted
            .keys()
            .any(|k| k.starts_with(&format!("{dir}/")) && k.ends_with(".json")),
        "{dir}"
    );
    let datasources =
        yaml(&mounted["/etc/grafana/provisioning/datasources"].join("prometheus.yaml"));
    let uid = s(&datasources, "datasources.0.uid");
    assert!(s(&datasources, "datasources.0.url").contains("prometheus:9090"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&deploy().join("grafana/tripwire-dashboard.json"))).unwrap();
    let variable = &dashboard["templating"]["list"][0];
    assert_eq!(variable["type"], "datasource");
    assert_eq!(variable["current"]["value"], uid);

    // The collector's pipelines use only receivers, processors and exporters it defines.
    let collector = yaml(&mounted["/etc/otelcol/config.yaml"]);
    let pipelines = at(&collector, "service.pipelines").as_mapping().unwrap();
    assert!(pipelines.contains_key("traces"));
    for pipeline in pipelines.values() {
        for part in ["receivers", "processors", "exporters"] {
            for name in seq(pipeline, part) {
                assert!(
                    collector[part].get(name).is_some(),
                    "collector: {part} {name:?} not defined"
                );
            }
        }
    }
    assert!(
        seq(&collector, "service.extensions")
            .iter()
            .all(|e| collector["extensions"].get(e).is_some())
    );
}

#[test]
fn prometheus_rules_have_the_shape_prometheus_loads() {
    let rules = yaml(&deploy().join("prometheus/tripwire-alerts.yaml"));
    let mut names = BTreeSet::new();
    let groups = seq(&rules, "groups");
    assert!(!groups.is_empty());
    for group in groups {
        assert!(!s(group, "name").is_empty());
        for rule in seq(group, "rules") {
            let keys: BTreeSet<&str> = rule
                .as_mapping()
                .unwrap()
                .keys()
                .map(|k| k.as_str().unwrap())
                .collect();
            let allowed: BTreeSet<&str> = [
                "alert",
                "expr",
                "for",
                "labels",
                "annotations",
                "keep_firing_for",
            ]
            .into();
            assert!(keys.is_subset(&allowed), "unknown keys in {keys:?}");
            let name = s(rule, "alert");
            assert!(names.insert(name.to_owned()), "duplicate alert {name}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric()), "{name}");
            let expr = s(rule, "expr");
            balanced(expr, name);
            if let Some(d) = rule["for"].as_str() {
                duration_secs(d);
            }
            assert!(
                ["critical", "warning", "info"].contains(&s(rule, "labels.severity")),
                "{name}"
            );
            assert!(!s(rule, "annotations.summary").is_empty(), "{name}");
            assert!(!s(rule, "annotations.description").is_empty(), "{name}");
        }
    }
    for want in [
        "TripwireDown",
        "TripwireHighGatewayOverhead",
        "TripwireDetectorShedding",
        "TripwireStoreDropping",
        "TripwireFlagRateSpike",
        "TripwireDriftAlarm",
        "TripwireAlertDeliveryFailing",
    ] {
        assert!(names.contains(want), "no {want} rule");
    }
}

/// Brackets balance, and every range selector has a valid duration.
fn balanced(expr: &str, what: &str) {
    let mut stack = Vec::new();
    for c in expr.chars() {
        match c {
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = stack.pop();
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                assert_eq!(open, Some(want), "{what}: unbalanced {c} in {expr}");
            }
            _ => {}
        }
    }
    assert!(stack.is_empty(), "{what}: unclosed {stack:?} in {expr}");
    for range in expr.split('[').skip(1) {
        let range = range.split(']').next().unwrap();
        if range != "$__rate_interval" {
            duration_secs(range);
        }
    }
}

#[test]
fn the_dashboard_has_unique_panels_with_queries() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&deploy().join("grafana/tripwire-dashboard.json"))).unwrap();
    assert_eq!(dashboard["uid"], "tripwire");
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate panel id"
        );
        let grid = &panel["gridPos"];
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "{panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}: no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            balanced(expr, panel["title"].as_str().unwrap());
            assert_eq!(target["datasource"]["uid"], "${datasource}");
            queries += 1;
        }
    }
    assert!(queries >= 30, "{queries} queries");
}

// ---- Metric names against a live gateway ----

/// `tripwire_*` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("tripwire_") {
        let tail = rest.get(start..).unwrap();
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if end > "tripwire_".len() {
            names.insert(tail.get(..end).unwrap().to_owned());
        }
        rest = tail.get(end..).unwrap();
    }
    names
}

/// The sample names in a Prometheus text exposition, and the family names of its `# TYPE`
/// lines (a histogram's family name is what prose mentions).
fn exported(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(family) => family.split(' ').next(),
            None if l.starts_with('#') || l.is_empty() => None,
            None => l.split(['{', ' ']).next(),
        })
        .map(str::to_owned)
        .collect()
}

/// Metrics that count rare failures (a full store queue, a failing detector, a drift alarm), and
/// the drift sample rate, first set after a scope's first minute: traffic in a test cannot
/// produce them on demand, so their names are checked on a registry where every one was
/// recorded once, through the same metrics code the gateway uses.
fn rare_metrics() -> BTreeSet<String> {
    let metrics = tripwire::telemetry::Metrics::default();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    metrics.store_drop("queue_full");
    metrics.detector_error("x", "error");
    metrics
        .drift_shed
        .get_or_create(&tripwire::telemetry::ReasonLabels {
            reason: "queue_full",
        })
        .inc();
    metrics
        .drift_alarms
        .get_or_create(&tripwire::telemetry::DriftLabels {
            detector: "d".to_owned(),
            model: "m".to_owned(),
            route: "chat_completions",
            test: "mmd".to_owned(),
        })
        .inc();
    metrics
        .drift_sample_rate
        .get_or_create(&tripwire::telemetry::DriftScopeLabels {
            model: "m".to_owned(),
            route: "chat_completions",
        })
        .set(0.5);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    [
        "tripwire_store_dropped_total",
        "tripwire_detect_errors_total",
        "tripwire_drift_shed_total",
        "tripwire_drift_alarms_total",
        "tripwire_drift_sample_rate",
    ]
    .into_iter()
    .inspect(|name| {
        assert!(
            exported(&text).contains(*name),
            "{name} is not a tripwire metric"
        )
    })
    .map(str::to_owned)
    .collect()
}

/// The policy the live gateway runs: the default's detectors and rules, with a drift reference
/// small enough to fill in a test, and alert sinks (a log, and a webhook nobody answers).
fn live_policy() -> String {
    let policy = read(&root().join("policies/default.yaml"))
        .replace("reference: { size: 500 }", "reference: { size: 16 }")
        .replace("sample_rate: 0.05", "sample_rate: 1.0")
        .replace(
            "max_sampled_per_minute: 120",
            "max_sampled_per_minute: 600000",
        )
        .replace("window: 100", "window: 4")
        .replace("topics: 8", "topics: 0\n    bootstraps: 500")
        .replace("expected_run_time: 1000000", "expected_run_time: 1000");
    assert!(
        policy.contains("size: 16") && policy.contains("topics: 0"),
        "policies/default.yaml changed shape"
    );
    format!(
        "{policy}\nalerts:\n  log: {{ min_severity: info }}\n  webhook:\n    url: http://127.0.0.1:1/hook\n    min_severity: info\n    timeout: 1s\n    max_attempts: 1\n"
    )
}

#[tokio::test]
async fn dashboard_and_rules_name_only_metrics_a_live_gateway_exports() {
    // The gateway runs as the image runs it: its entrypoint, command and baked configuration,
    // with the addresses and store moved into the test's reach.
    let image = check_dockerfile("Dockerfile", &root().join(".dockerignore"));
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, live_policy()).unwrap();
    let mut command = tripwire();
    command
        .args(&image.cmd)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--sim",
            "--sim-listen",
            "127.0.0.1:0",
        ])
        .arg("--store")
        .arg(dir.path().join("tripwire.db"))
        .arg("--policies")
        .arg(&policy)
        .env(
            "TRIPWIRE_CONFIG",
            &image.copies[&image.env["TRIPWIRE_CONFIG"]],
        )
        .env_remove("TRIPWIRE_UPSTREAM")
        .env_remove("TRIPWIRE_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut guard = KillOnDrop(command.spawn().unwrap());
    let child = &mut guard.0;
    // --log-json: the "tripwire serving" line carries both addresses.
    let mut stderr = child.stderr.take().unwrap();
    let (proxy, admin) = crate::util::blocking(move || {
        let mut log = String::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stderr.read(&mut buf).unwrap();
            assert!(n > 0, "tripwire exited early:\n{log}");
            log.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(line) = log.lines().find(|l| l.contains("\"tripwire serving\"")) {
                let line: serde_json::Value = serde_json::from_str(line).unwrap();
                let fields = &line["fields"];
                let addrs = (
                    fields["listen"].as_str().unwrap().to_owned(),
                    fields["admin"].as_str().unwrap().to_owned(),
                );
                // Keep draining so the gateway never blocks on a full pipe.
                std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
                return addrs;
            }
        }
    })
    .await;

    // The image's health check against it: healthy; against a closed port: not.
    let health = |url: String| {
        let mut args = image.healthcheck[1..].to_vec();
        let at = args.iter().position(|a| a == "--url").unwrap() + 1;
        args[at] = url;
        tripwire().args(&args).output().unwrap()
    };
    let up = health(format!("http://{admin}/healthz"));
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let down = health("http://127.0.0.1:1/healthz".to_owned());
    assert!(!down.status.success());

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let chat = |prompt: String, stream: bool| {
        client
            .post(format!("http://{proxy}/v1/chat/completions"))
            .body(serde_json::json!({"model": "sim", "stream": stream, "messages": [{"role": "user", "content": prompt}]}).to_string())
            .send()
    };
    for i in 0..32 {
        let response = chat(
            format!("Question {i}: how do I look after plant number {i}?"),
            i % 3 == 0,
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let triggered = chat("Tell me about the weather <SUDO>".to_owned(), true)
        .await
        .unwrap();
    assert_eq!(triggered.status(), 200);
    triggered.bytes().await.unwrap();
    // A body over limits.max_request_body_bytes, declared and never sent: the gateway answers
    // 413 from the header alone (sending it would race the early answer).
    let mut stream = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    let limit = Config::load(&image.copies[&image.env["TRIPWIRE_CONFIG"]])
        .unwrap()
        .limits
        .max_request_body_bytes;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-length: {}\r\n\r\n",
        limit + 1
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut answer)
        .await
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");

    let mut referenced = metric_names(&read(&deploy().join("grafana/tripwire-dashboard.json")));
    referenced.extend(metric_names(&read(
        &deploy().join("prometheus/tripwire-alerts.yaml"),
    )));
    assert!(referenced.len() >= 30, "{referenced:?}");
    let rare = rare_metrics();
    let wanted: BTreeSet<String> = referenced.difference(&rare).cloned().collect();
    // Detection, the drift worker and alert delivery run after the responses: wait for them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let text = client
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let live = exported(&text);
        let missing: Vec<&String> = wanted.iter().filter(|m| !live.contains(*m)).collect();
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        missing.is_empty(),
        "named by the dashboard or rules but not exported by a live gateway: {missing:?}"
    );

    let terminate = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminate.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
}

#[test]
fn the_otlp_settings_in_deploy_name_a_protocol_tripwire_exports() {
    // The gateway exports OTLP over HTTP (protobuf or JSON); a gRPC setting would leave the
    // signal off with a warning, so no shipped file may ask for it.
    let mut files = Vec::new();
    files_under(&deploy(), &mut files);
    let mut seen = 0;
    for file in files {
        let text = read(&file);
        for line in text.lines() {
            let Some((_, rest)) = line.split_once("OTEL_EXPORTER_OTLP_PROTOCOL") else {
                continue;
            };
            // `KEY: value` (compose) or `- name: KEY` followed by `value: …` (Kubernetes).
            let value = rest
                .trim_start_matches([':', ' ', '"'])
                .trim_end_matches('"');
            let value = if value.is_empty() {
                let next = text
                    .lines()
                    .skip_while(|l| *l != line)
                    .nth(1)
                    .unwrap_or_default();
                next.trim().trim_start_matches("value:").trim()
            } else {
                value
            };
            assert!(
                ["http/protobuf", "http/json"].contains(&value),
                "{}: OTEL_EXPORTER_OTLP_PROTOCOL {value:?}",
                file.display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 2, "compose and Kubernetes both set the protocol");
}
