# The seven images, built with one shared base (Dockerfile.base) from the repository root:
#
#   docker buildx bake                      # all seven, tagged ${REGISTRY}/<image>:${VERSION}
#   docker buildx bake backdata mxserver    # some of them
#   REGISTRY=registry.example.com/mailer docker buildx bake --push
#
# Each image is <Module>/Dockerfile on top of `service`: Dockerfile.base built for that module's
# workspace package.  `./mailer version X.Y.Z` rewrites VERSION together with every other
# place the version is written.

variable "VERSION" {
  default = "2.0.0"
}

variable "REGISTRY" {
  default = "inboxbooster"
}

# Module folder, image name, workspace package (its console script is the image's ENTRYPOINT).
variable "MODULES" {
  default = [
    { folder = "Redis", image = "redis", package = "redis-sidecar" },
    { folder = "BackData", image = "backdata", package = "backdata" },
    { folder = "MxServer", image = "mxserver", package = "mxserver" },
    { folder = "PostfixLog", image = "postfixlog", package = "postfixlog" },
    { folder = "Transformer", image = "transformer", package = "transformer" },
    { folder = "Receiver", image = "receiver", package = "receiver" },
    { folder = "HttpReceiver", image = "httpreceiver", package = "httpreceiver" },
  ]
}

group "default" {
  targets = ["image"]
}

# The shared stages, once per module.
target "base" {
  name       = "base-${m.image}"
  matrix     = { m = MODULES }
  context    = "."
  dockerfile = "Dockerfile.base"
  target     = "service"
  # Python and uv are named once, in Dockerfile.base (override: --set 'base-*.args.UV_IMAGE=…').
  args = {
    PACKAGE = m.package
  }
}

# The images: each module's own Dockerfile, FROM service.
target "image" {
  name       = m.image
  matrix     = { m = MODULES }
  context    = "."
  dockerfile = "${m.folder}/Dockerfile"
  contexts = {
    service = "target:base-${m.image}"
  }
  tags = ["${REGISTRY}/${m.image}:${VERSION}"]
  labels = {
    "org.opencontainers.image.title"   = "inboxbooster-mailer ${m.image}"
    "org.opencontainers.image.version" = VERSION
    "org.opencontainers.image.licenses" = "MIT"
  }
}
