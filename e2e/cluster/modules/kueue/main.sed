# e2e/cluster/build compiles Kueue's manager from a copy of cmd/kueue/main.go (in the tool's cache
# folder) edited by this script. Without its internal certificate management (whose certificates
# name a Service, which the local cluster's API server cannot reach), the manager reads its metrics
# certificate from the fixed path /etc/kueue/metrics/certs, where a pod has it mounted. The copy
# reads it from $KUEUE_METRICS_CERT_DIR when that is set, so e2e/kueue.py need not write to /etc.
s|metricsCertPath := "/etc/kueue/metrics/certs"|metricsCertPath := "/etc/kueue/metrics/certs"\n\t\tif dir := os.Getenv("KUEUE_METRICS_CERT_DIR"); dir != "" {\n\t\t\tmetricsCertPath = dir\n\t\t}|
