"""Identity: who a socket belongs to. cgroup -> container/pod (kubelet naming), netns -> pod,
IP -> pod/service, from the Kubernetes watch or standalone facts. Used by the aggregate stage
and the exporter to name series; never imports a source."""
