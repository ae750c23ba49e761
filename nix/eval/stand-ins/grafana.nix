# The part of nixpkgs' services.grafana that nixos-modules/monitoring.nix uses, typed as in
# nixpkgs nixos/modules/services/monitoring/grafana.nix. Source: the 2025/26 master version in
# the search tool's index, for every declaration below but settings.security.secret_key: there it
# is `nullOr str` without a default, with an assertion whose message dates the change to the
# 26.05 release notes, so the index's 2023 declaration (`str`, the old default) is kept, the one
# 25.11 should still have (ours sets it either way). The assertions and warnings kept are in
# both versions.
# Declared: enable, package, dataDir, provision.{enable,datasources,dashboards} (datasource and
# dashboard-provider submodules with their freeform YAML type; of the provisioning files' own
# options only apiVersion and the list), and in `settings` (freeform INI,
# like nixpkgs) the server, security and database settings monitoring.nix sets or the module
# reads. Config kept: the grafana user and group, the unit's user/ordering/wantedBy, the
# assertions on provisioning and the warnings on secrets that would land in the store.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.grafana;
  inherit (lib) types mkOption;
  provisioningSettingsFormat = pkgs.formats.yaml { };
  settingsFormatIni = pkgs.formats.ini {
    listToValue = lib.concatMapStringsSep " " (lib.generators.mkValueStringDefault { });
  };

  datasourceConfig = types.submodule {
    freeformType = provisioningSettingsFormat.type;
    options = {
      access = mkOption {
        default = "proxy";
        type = types.enum [
          "proxy"
          "direct"
        ];
      };
      editable = mkOption {
        default = false;
        type = types.bool;
      };
      jsonData = mkOption {
        default = null;
        type = types.nullOr types.attrs;
      };
      name = mkOption { type = types.str; };
      secureJsonData = mkOption {
        default = null;
        type = types.nullOr types.attrs;
      };
      type = mkOption { type = types.str; };
      uid = mkOption {
        default = null;
        type = types.nullOr types.str;
      };
      url = mkOption {
        default = "";
        type = types.str;
      };
    };
  };

  dashboardConfig = types.submodule {
    freeformType = provisioningSettingsFormat.type;
    options = {
      options.path = mkOption { type = types.path; };
      name = mkOption {
        default = "default";
        type = types.str;
      };
      type = mkOption {
        default = "file";
        type = types.str;
      };
    };
  };

  provisionFiles =
    attr: elemType:
    mkOption {
      default = { };
      type = types.submodule {
        options.path = mkOption {
          default = null;
          type = types.nullOr types.path;
        };
        options.settings = mkOption {
          default = null;
          type = types.nullOr (
            types.submodule {
              options.apiVersion = mkOption {
                default = 1;
                type = types.int;
              };
              options.${attr} = mkOption {
                default = [ ];
                type = types.listOf elemType;
              };
            }
          );
        };
      };
    };
in
{
  options.services.grafana = {
    enable = lib.mkEnableOption "grafana";
    package = lib.mkPackageOption pkgs "grafana" { };
    dataDir = mkOption {
      default = "/var/lib/grafana";
      type = types.path;
    };
    provision = {
      enable = lib.mkEnableOption "provision";
      datasources = provisionFiles "datasources" datasourceConfig;
      dashboards = provisionFiles "providers" dashboardConfig;
    };
    settings = mkOption {
      default = { };
      type = types.submodule {
        freeformType = settingsFormatIni.type;
        options = {
          database = {
            password = mkOption {
              default = "";
              type = types.str;
            };
            type = mkOption {
              default = "sqlite3";
              type = types.enum [
                "mysql"
                "sqlite3"
                "postgres"
              ];
            };
          };
          security = {
            admin_password = mkOption {
              default = "admin";
              type = types.str;
            };
            admin_user = mkOption {
              default = "admin";
              type = types.str;
            };
            disable_gravatar = mkOption {
              default = false;
              type = types.bool;
            };
            # 2023: `types.str`, this default; 26.05 notes: `nullOr str`, no default (see above).
            secret_key = mkOption {
              default = "SW2YcwTIb9zpOOhoPsMm";
              type = types.str;
            };
          };
          server = {
            http_addr = mkOption {
              default = "127.0.0.1";
              type = types.str;
            };
            http_port = mkOption {
              default = 3000;
              type = types.port;
            };
            protocol = mkOption {
              default = "http";
              type = types.enum [
                "http"
                "https"
                "h2"
                "socket"
              ];
            };
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.provision.datasources.settings == null || cfg.provision.datasources.path == null;
        message = "Cannot set both datasources settings and datasources path";
      }
      {
        assertion =
          cfg.provision.datasources.settings == null
          || lib.all (
            { access, type, ... }: type == "prometheus" -> access != "direct"
          ) cfg.provision.datasources.settings.datasources;
        message = "For datasources of type `prometheus`, the `direct` access mode is not supported anymore (since Grafana 9.2.0)";
      }
      {
        assertion = cfg.provision.dashboards.settings == null || cfg.provision.dashboards.path == null;
        message = "Cannot set both dashboards settings and dashboards path";
      }
    ];

    warnings =
      let
        doesntUseFileProvider =
          opt: defaultValue:
          let
            regex = "${
              lib.optionalString (defaultValue != null) "^${defaultValue}$|"
            }^\\$__(file|env)\\{.*}$|^\\$[^_\\$][^ ]+$";
          in
          builtins.match regex opt == null;
      in
      lib.optional (
        doesntUseFileProvider cfg.settings.database.password ""
        || doesntUseFileProvider cfg.settings.security.admin_password "admin"
      ) "Grafana passwords will be stored as plaintext in the Nix store! Use file provider or an env-var instead."
      ++ lib.optional (
        cfg.provision.datasources.settings != null
        && lib.any (
          { secureJsonData, ... }:
          secureJsonData != null && lib.any (v: doesntUseFileProvider v null) (lib.attrValues secureJsonData)
        ) cfg.provision.datasources.settings.datasources
      ) "Declarations in the `secureJsonData`-block of a datasource will be leaked to the Nix store unless a file-provider or an env-var is used!";

    systemd.services.grafana = {
      description = "Grafana Service Daemon";
      after = [ "network.target" ];
      wantedBy = [ "multi-user.target" ];
      script = "exec ${lib.getExe cfg.package} server -homepath ${cfg.dataDir}";
      serviceConfig = {
        Restart = "on-failure";
        RuntimeDirectory = "grafana";
        User = "grafana";
        WorkingDirectory = cfg.dataDir;
      };
    };
    users.groups.grafana = { };
    users.users.grafana = {
      description = "Grafana user";
      group = "grafana";
      home = cfg.dataDir;
    };
  };
}
