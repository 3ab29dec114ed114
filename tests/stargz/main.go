// containerd-stargz-grpc for the tests: the stargz snapshotter library's snapshotter served
// as a containerd proxy snapshotter on a Unix socket. Registries are reached anonymously;
// each -plain-http host is reached over plain HTTP. The CRI and kubeconfig keychains are
// left out (they need Kubernetes packages Debian does not ship).
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"google.golang.org/grpc"
)

type hostList []string

func (h *hostList) String() string     { return strings.Join(*h, ",") }
func (h *hostList) Set(v string) error { *h = append(*h, v); return nil }

func main() {
	address := flag.String("address", "", "Unix socket to serve the snapshotter on")
	root := flag.String("root", "", "directory for the snapshotter's state")
	noBackgroundFetch := flag.Bool("no-background-fetch", false, "fetch file data only when read")
	var plainHTTP hostList
	flag.Var(&plainHTTP, "plain-http", "registry host:port reached over plain HTTP (repeatable)")
	flag.Parse()
	if *address == "" || *root == "" {
		fmt.Fprintln(os.Stderr, "containerd-stargz-grpc: -address and -root are required")
		os.Exit(2)
	}

	ctx := context.Background()
	config := service.Config{}
	config.NoBackgroundFetch = *noBackgroundFetch
	config.ResolverConfig.Host = map[string]resolver.HostConfig{}
	for _, h := range plainHTTP {
		config.ResolverConfig.Host[h] = resolver.HostConfig{
			Mirrors: []resolver.MirrorConfig{{Host: h, Insecure: true}},
		}
	}
	sn, err := service.NewStargzSnapshotterService(ctx, *root, &config)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot create the stargz snapshotter")
	}

	if err := os.RemoveAll(*address); err != nil {
		log.G(ctx).WithError(err).Fatal("cannot remove an old socket")
	}
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot listen")
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		rpc.GracefulStop()
	}()
	if err := rpc.Serve(l); err != nil {
		log.G(ctx).WithError(err).Fatal("serve failed")
	}
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Error("closing the snapshotter failed")
	}
}
