//! The one endpoint dimension: which side of a connection names it.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::{
    event::{ConnEvent, Direction},
    service::Service,
};

/// `--by`: how connections are grouped into endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointBy {
    /// Listeners by local port (`*:8080`), clients by remote ip:port: the
    /// service a connection belongs to, whichever side we are.
    #[default]
    Auto,
    /// By the far end: ip:port for connections we opened, ip for accepted
    /// ones (their port is the client's ephemeral one).
    Remote,
    /// By local listening port; connections we opened count as `outbound`.
    LocalPort,
    /// By the service of the local process: its systemd unit or container
    /// id, else its cgroup path (`unknown` when that is gone).
    Service,
    /// No endpoint dimension.
    None,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointKey {
    Remote(SocketAddr),
    RemoteHost(IpAddr),
    Listener(u16),
    Outbound,
    Service(Arc<Service>),
    /// `--by service` for a cgroup netlens could not resolve.
    UnknownService,
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointKey::Remote(addr) => write!(f, "{addr}"),
            EndpointKey::RemoteHost(ip) => write!(f, "{ip}"),
            EndpointKey::Listener(port) => write!(f, "*:{port}"),
            EndpointKey::Outbound => f.write_str("outbound"),
            EndpointKey::Service(service) => write!(f, "{service}"),
            EndpointKey::UnknownService => f.write_str("unknown"),
        }
    }
}

impl EndpointKey {
    pub fn is_listener(&self) -> bool {
        matches!(self, EndpointKey::Listener(_))
    }
}

/// Whether we opened the connection; for connections netlens did not see
/// open, a guess: the lower port is usually the service's.
fn opened_by_us(event: &ConnEvent) -> bool {
    match event.direction {
        Some(direction) => direction == Direction::Active,
        None => event.remote.port() < event.local.port(),
    }
}

impl EndpointBy {
    /// The endpoint `event` belongs to; `None` when there is no dimension.
    pub fn key(self, event: &ConnEvent) -> Option<EndpointKey> {
        let active = opened_by_us(event);
        match self {
            EndpointBy::None => None,
            EndpointBy::Service => Some(event.service.clone().map_or(EndpointKey::UnknownService, EndpointKey::Service)),
            EndpointBy::Auto if active => Some(EndpointKey::Remote(event.remote)),
            EndpointBy::Auto => Some(EndpointKey::Listener(event.local.port())),
            EndpointBy::Remote if active => Some(EndpointKey::Remote(event.remote)),
            EndpointBy::Remote => Some(EndpointKey::RemoteHost(event.remote.ip())),
            EndpointBy::LocalPort if active => Some(EndpointKey::Outbound),
            EndpointBy::LocalPort => Some(EndpointKey::Listener(event.local.port())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{sample, Detail};

    fn with_direction(direction: Option<Direction>) -> ConnEvent {
        // sample(): local [::1]:8080, remote [::1]:40000.
        ConnEvent { direction, ..sample(Detail::ResetReceived) }
    }

    #[test]
    fn auto_names_listeners_by_port_and_clients_by_remote() {
        let passive = with_direction(Some(Direction::Passive));
        let active = with_direction(Some(Direction::Active));
        assert_eq!(EndpointBy::Auto.key(&passive).unwrap().to_string(), "*:8080");
        assert_eq!(EndpointBy::Auto.key(&active).unwrap().to_string(), "[::1]:40000");
        assert_eq!(EndpointBy::Remote.key(&passive).unwrap().to_string(), "::1");
        assert_eq!(EndpointBy::LocalPort.key(&active).unwrap().to_string(), "outbound");
        assert_eq!(EndpointBy::None.key(&active), None);
    }

    #[test]
    fn service_names_the_unit_else_the_path() {
        let mut event = with_direction(Some(Direction::Passive));
        assert_eq!(EndpointBy::Service.key(&event), Some(EndpointKey::UnknownService));
        assert_eq!(EndpointBy::Service.key(&event).unwrap().to_string(), "unknown");
        event.service = Some(Arc::new(Service::from_path("/system.slice/nginx.service/worker".into())));
        assert_eq!(EndpointBy::Service.key(&event).unwrap().to_string(), "nginx.service");
        event.service = Some(Arc::new(Service::from_path("/batch/jobs".into())));
        assert_eq!(EndpointBy::Service.key(&event).unwrap().to_string(), "/batch/jobs");
        assert!(!EndpointBy::Service.key(&event).unwrap().is_listener());
    }

    #[test]
    fn unknown_direction_guesses_from_ports() {
        // Remote port 40000 > local 8080: we are the listener.
        assert!(EndpointBy::Auto.key(&with_direction(None)).unwrap().is_listener());
    }
}
