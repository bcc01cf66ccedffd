//! The `[telemetry]` settings.

use super::ConfigError;

/// The `[telemetry]` settings: OpenTelemetry producer spans ([`crate::telemetry`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Create a producer span per published event and export it (needs the `otel` build).
    pub enabled: bool,
    /// Base URL of the OTLP/HTTP collector (`/v1/traces` is appended); empty = the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else `http://localhost:4318`.
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute of the exported spans.
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            enabled: false,
            otlp_endpoint: String::new(),
            service_name: "outbox-relay".to_owned(),
        }
    }
}

impl TelemetrySettings {
    /// Checks that the settings can be honoured by this build; the error names the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled && !cfg!(feature = "otel") {
            return Err(ConfigError::new(
                "telemetry.enabled",
                "this outbox-relay was built without OpenTelemetry support (cargo feature `otel`)",
            ));
        }
        if self.enabled && self.service_name.trim().is_empty() {
            return Err(ConfigError::new(
                "telemetry.service_name",
                "must not be empty",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabling_telemetry_needs_the_otel_build() {
        let mut s = TelemetrySettings::default();
        assert!(s.validate().is_ok(), "off by default");
        s.enabled = true;
        let built_with_otel = cfg!(feature = "otel");
        match s.validate() {
            Ok(()) => assert!(built_with_otel, "accepted without the feature"),
            Err(e) => {
                assert!(!built_with_otel, "refused with the feature: {e}");
                assert_eq!(e.key, "telemetry.enabled");
                assert!(e.reason.contains("`otel`"), "{e}");
            }
        }
        s.service_name = " ".into();
        if cfg!(feature = "otel") {
            assert_eq!(s.validate().unwrap_err().key, "telemetry.service_name");
        }
    }
}
