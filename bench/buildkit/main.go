// Command bkbench times BuildKit's own cache manager (moby/buildkit at a9f1980eb) on a
// containerd socket, for bench/run.py's `--buildkit` side-by-side figures. It is built inside
// a BuildKit source tree of that commit, with its vendor directory (see README.md); nothing
// here is BuildKit's code.
//
// Usage: bkbench -address SOCKET -root DIR -op OP [-data DIR] [-blobs FILE]
//
// Ops, each timed once, in a namespace of its own that is pruned afterwards:
//
//	remote-uncompressed, remote-gzip: GetRemote of a fresh chain whose layers each add one
//	       file, the files -data names (layer-0, layer-1, ... in a directory)
//	blobs: GetByBlob of the layers listed in -blobs (a JSON list of {descriptor, path}) and
//	       Extract of the last
//	du: DiskUsage of 1,000 fresh records whose sizes are unknown
//
// Prints one line: the op and the seconds the timed part took.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/content"
	"github.com/containerd/containerd/gc"
	"github.com/containerd/containerd/leases"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/moby/buildkit/cache"
	"github.com/moby/buildkit/cache/metadata"
	"github.com/moby/buildkit/client"
	"github.com/moby/buildkit/session"
	containerdsnapshot "github.com/moby/buildkit/snapshot/containerd"
	"github.com/moby/buildkit/util/compression"
	"github.com/moby/buildkit/util/leaseutil"
	"github.com/moby/buildkit/util/winlayers"
	digest "github.com/opencontainers/go-digest"
	ocispecs "github.com/opencontainers/image-spec/specs-go/v1"
)

const records = 1000

func main() {
	address := flag.String("address", "", "containerd socket")
	root := flag.String("root", "", "state directory (created)")
	op := flag.String("op", "", "remote-uncompressed, remote-gzip, blobs or du")
	blobsFile := flag.String("blobs", "", "for -op blobs: JSON list of {descriptor, path}")
	data := flag.String("data", "", "for -op remote-*: the directory of the layers' files")
	flag.Parse()
	if err := run(*address, *root, *op, *blobsFile, *data); err != nil {
		fmt.Fprintln(os.Stderr, "bkbench:", err)
		os.Exit(1)
	}
}

func newManager(ctx context.Context, address, root, ns string) (cache.Manager, *containerd.Client, error) {
	c, err := containerd.New(address, containerd.WithDefaultNamespace(ns))
	if err != nil {
		return nil, nil, err
	}
	// As BuildKit's containerd worker wires it (worker/containerd/containerd.go).
	df := c.DiffService()
	lm := leaseutil.WithNamespace(c.LeasesService(), ns)
	cs := containerdsnapshot.NewContentStore(c.ContentStore(), ns)
	snap := containerdsnapshot.NewSnapshotter("overlayfs", c.SnapshotService("overlayfs"), ns, nil)
	if err := os.MkdirAll(root, 0700); err != nil {
		return nil, nil, err
	}
	md, err := metadata.NewStore(filepath.Join(root, "metadata_v2.db"))
	if err != nil {
		return nil, nil, err
	}
	cm, err := cache.NewManager(cache.ManagerOpt{
		Snapshotter:  snap,
		Applier:      winlayers.NewFileSystemApplierWithWindows(cs, df),
		Differ:       winlayers.NewWalkingDiffWithWindows(cs, df),
		LeaseManager: lm,
		ContentStore: cs,
		GarbageCollect: func(ctx context.Context) (gc.Stats, error) {
			// BuildKit's worker: a synchronous collection through an empty lease.
			l, err := lm.Create(ctx)
			if err != nil {
				return nil, nil
			}
			return nil, lm.Delete(ctx, leases.Lease{ID: l.ID}, leases.SynchronousDelete)
		},
		MetadataStore: md,
	})
	return cm, c, err
}

func run(address, root, op, blobsFile, data string) error {
	ns := fmt.Sprintf("bench-bk-%d", time.Now().UnixNano())
	ctx := namespaces.WithNamespace(context.Background(), ns)
	cm, c, err := newManager(ctx, address, root, ns)
	if err != nil {
		return err
	}
	defer c.Close()
	var elapsed time.Duration
	var held []cache.ImmutableRef
	switch op {
	case "remote-uncompressed", "remote-gzip":
		comp := compression.Uncompressed
		if op == "remote-gzip" {
			comp = compression.Gzip
		}
		held, err = chain(ctx, cm, data)
		if err != nil {
			return err
		}
		started := time.Now()
		if _, err := held[len(held)-1].GetRemote(ctx, true, comp, false, nil); err != nil {
			return err
		}
		elapsed = time.Since(started)
	case "blobs":
		held, elapsed, err = byBlob(ctx, cm, blobsFile)
		if err != nil {
			return err
		}
	case "du":
		for i := 0; i < records; i++ {
			mr, err := cm.New(ctx, nil, nil, cache.CachePolicyRetain)
			if err != nil {
				return err
			}
			if err := mr.Release(ctx); err != nil {
				return err
			}
		}
		started := time.Now()
		if _, err := cm.DiskUsage(ctx, client.DiskUsageInfo{}); err != nil {
			return err
		}
		elapsed = time.Since(started)
	default:
		return fmt.Errorf("unknown op %q", op)
	}
	fmt.Printf("%s %.6f\n", op, elapsed.Seconds())
	for _, ref := range held {
		if err := ref.Release(ctx); err != nil {
			return err
		}
	}
	if err := cm.Prune(ctx, nil, client.PruneInfo{All: true}); err != nil {
		return err
	}
	if err := cm.Close(); err != nil {
		return err
	}
	return cleanNamespace(ctx, c)
}

// chain makes committed layers of one file each, as bench/run.py's _chain does.
func chain(ctx context.Context, cm cache.Manager, dir string) ([]cache.ImmutableRef, error) {
	var refs []cache.ImmutableRef
	var parent cache.ImmutableRef
	for i := 0; ; i++ {
		data, err := ioutil.ReadFile(filepath.Join(dir, fmt.Sprintf("layer-%d", i)))
		if os.IsNotExist(err) {
			break
		}
		if err != nil {
			return nil, err
		}
		mr, err := cm.New(ctx, parent, nil)
		if err != nil {
			return nil, err
		}
		mountable, err := mr.Mount(ctx, false, nil)
		if err != nil {
			return nil, err
		}
		mounts, release, err := mountable.Mount()
		if err != nil {
			return nil, err
		}
		err = mount.WithTempMount(ctx, mounts, func(root string) error {
			return ioutil.WriteFile(filepath.Join(root, fmt.Sprintf("layer-%d", i)), data, 0644)
		})
		if release != nil {
			release()
		}
		if err != nil {
			return nil, err
		}
		ref, err := mr.Commit(ctx)
		if err != nil {
			return nil, err
		}
		refs = append(refs, ref)
		parent = ref
	}
	return refs, nil
}

type blobEntry struct {
	Descriptor ocispecs.Descriptor `json:"descriptor"`
	Path       string              `json:"path"`
}

// fileProvider serves blobs from files, as a registry would send them.
type fileProvider map[digest.Digest]string

func (p fileProvider) ReaderAt(ctx context.Context, desc ocispecs.Descriptor) (content.ReaderAt, error) {
	f, err := os.Open(p[desc.Digest])
	if err != nil {
		return nil, err
	}
	return sizedFile{f, desc.Size}, nil
}

type sizedFile struct {
	*os.File
	size int64
}

func (f sizedFile) Size() int64 { return f.size }

func byBlob(ctx context.Context, cm cache.Manager, blobsFile string) ([]cache.ImmutableRef, time.Duration, error) {
	raw, err := ioutil.ReadFile(blobsFile)
	if err != nil {
		return nil, 0, err
	}
	var entries []blobEntry
	if err := json.Unmarshal(raw, &entries); err != nil {
		return nil, 0, err
	}
	provider := fileProvider{}
	// As BuildKit's puller does, every call gets the handlers of the whole chain.
	dhs := cache.DescHandlers{}
	for _, e := range entries {
		provider[e.Descriptor.Digest] = e.Path
		dhs[e.Descriptor.Digest] = &cache.DescHandler{
			Provider: func(session.Group) content.Provider { return provider },
		}
	}
	started := time.Now()
	var refs []cache.ImmutableRef
	var parent cache.ImmutableRef
	for _, e := range entries {
		ref, err := cm.GetByBlob(ctx, e.Descriptor, parent, dhs)
		if err != nil {
			return nil, 0, err
		}
		refs = append(refs, ref)
		parent = ref
	}
	if err := refs[len(refs)-1].Extract(ctx, nil); err != nil {
		return nil, 0, err
	}
	return refs, time.Since(started), nil
}

// cleanNamespace drops what the prune left (the blobs of the content store) by a lease-free
// collection: every lease of the namespace is deleted synchronously.
func cleanNamespace(ctx context.Context, c *containerd.Client) error {
	ls, err := c.LeasesService().List(ctx)
	if err != nil {
		return err
	}
	for _, l := range ls {
		if err := c.LeasesService().Delete(ctx, l, leases.SynchronousDelete); err != nil {
			return err
		}
	}
	return nil
}
