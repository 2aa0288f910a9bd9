# e2e/cluster/build compiles Prometheus from a copy of cmd/prometheus/main.go (in the tool's cache
# folder) edited by this script. cmd/prometheus imports plugins, which registers every service
# discovery and so compiles the AWS, Azure, GCE, ... SDKs, about half of a cold build (no build tag
# drops them). Its import becomes the service discoveries kubetune's tests use: kubernetes (the
# configuration prometheus-operator generates uses kubernetes_sd_configs), file and http (what
# plugins/minimum.go registers in every build).
s|^\t_ "github.com/prometheus/prometheus/plugins".*$|\t_ "github.com/prometheus/prometheus/discovery/file"\n\t_ "github.com/prometheus/prometheus/discovery/http"\n\t_ "github.com/prometheus/prometheus/discovery/kubernetes"|
