//! What a person recognises in a cgroup v2 path: the systemd unit
//! (`nginx.service`, `session-3.scope`) or the container id
//! (`docker-<id>`, `cri-containerd-<id>`, `crio-<id>`, `libpod-<id>`).
//! Pure string work, so every layout gets a table test.

/// Runtimes whose systemd cgroup driver names a container's scope
/// `<prefix><64 hex>.scope`.
const CONTAINER_SCOPES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];

/// The unit or container a cgroup belongs to: the deepest path component
/// that names one (a container's scope, a bare container id under the
/// cgroupfs driver, or a `.service`/`.scope` unit); `None` when no
/// component does (the root cgroup, slices only, a hand-made directory).
/// Deepest wins: `nginx.service/worker` is nginx's, and a unit run by
/// systemd inside a container is more specific than the container.
pub fn service_name(cgroup_path: &str) -> Option<String> {
    let components: Vec<&str> = cgroup_path.split('/').filter(|c| !c.is_empty()).collect();
    for (depth, component) in components.iter().enumerate().rev() {
        let parent = depth.checked_sub(1).map(|p| components[p]);
        if let Some(container) = container_id(component, parent) {
            return Some(container);
        }
        if is_unit(component) {
            return Some((*component).to_string());
        }
    }
    None
}

/// `docker-<id>.scope` → `docker-<id>`; a bare 64-hex directory (the
/// cgroupfs driver: `/docker/<id>`, `/kubepods/…/pod<uid>/<id>`) → the id,
/// with `docker-` when its parent says so.
fn container_id(component: &str, parent: Option<&str>) -> Option<String> {
    if let Some(scope) = component.strip_suffix(".scope") {
        return CONTAINER_SCOPES
            .iter()
            .any(|prefix| scope.strip_prefix(prefix).is_some_and(is_container_hex))
            .then(|| scope.to_string());
    }
    if is_container_hex(component) {
        return Some(match parent {
            Some("docker") => format!("docker-{component}"),
            _ => component.to_string(),
        });
    }
    None
}

/// A container id as runtimes write it: 64 lowercase hex digits.
fn is_container_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A systemd unit that holds processes: `NAME.service` or `NAME.scope`
/// (slices only group them).
fn is_unit(component: &str) -> bool {
    [".service", ".scope"].iter().any(|suffix| component.strip_suffix(suffix).is_some_and(|name| !name.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::service_name;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn systemd_units() {
        let cases = [
            ("/system.slice/nginx.service", Some("nginx.service")),
            ("/system.slice/nginx.service/worker", Some("nginx.service")),
            ("/user.slice/user-1000.slice/session-3.scope", Some("session-3.scope")),
            ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", Some("foo.service")),
            ("/init.scope", Some("init.scope")),
            ("/system.slice/docker.service", Some("docker.service")),
            ("/", None),
            ("", None),
            ("/user.slice", None),
            ("/my-group/sub", None),
            ("/.service", None),
        ];
        for (path, want) in cases {
            assert_eq!(service_name(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn container_ids() {
        let cases = [
            (format!("/system.slice/docker-{ID}.scope"), format!("docker-{ID}")),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b.slice/cri-containerd-{ID}.scope"),
                format!("cri-containerd-{ID}"),
            ),
            (format!("/kubepods.slice/kubepods-pod1.slice/crio-{ID}.scope"), format!("crio-{ID}")),
            (format!("/machine.slice/libpod-{ID}.scope/container"), format!("libpod-{ID}")),
            // cgroupfs driver: bare ids.
            (format!("/docker/{ID}"), format!("docker-{ID}")),
            (format!("/kubepods/besteffort/pod1a2b/{ID}"), ID.to_string()),
            // A unit run by systemd inside a container is the more specific.
            (format!("/system.slice/docker-{ID}.scope/system.slice/nginx.service"), "nginx.service".to_string()),
        ];
        for (path, want) in cases {
            assert_eq!(service_name(&path).as_deref(), Some(want.as_str()), "{path}");
        }
    }

    #[test]
    fn near_misses_are_not_containers() {
        // conmon watches a container but is not it: a plain scope unit.
        let conmon = format!("/machine.slice/crio-conmon-{ID}.scope");
        assert_eq!(service_name(&conmon), Some(format!("crio-conmon-{ID}.scope")));
        // Too short, or upper case: not a runtime's id; not a unit either.
        assert_eq!(service_name("/docker/0123abcd"), None);
        assert_eq!(service_name(&format!("/docker/{}", ID.to_uppercase())), None);
        // A scope with a short id is still a unit.
        assert_eq!(service_name("/system.slice/docker-abc.scope").as_deref(), Some("docker-abc.scope"));
    }
}
