# Sourced by the bench scripts: a throw-away influxd config bound to loopback only, with
# reporting, the `_internal` store and subscriptions off.
#   influx_conf DIR HTTP_PORT RPC_PORT   # writes DIR/influxdb.conf, data under DIR
influx_conf() {
  mkdir -p "$1"
  cat > "$1/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$3"
[meta]
  dir = "$1/meta"
[data]
  dir = "$1/data"
  wal-dir = "$1/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:$2"
  log-enabled = false
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
CONF
}
